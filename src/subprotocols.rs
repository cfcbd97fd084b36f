//! `Sec-WebSocket-Protocol` on both legs (docs/security.md#subprotocols):
//! what a client offers, what is forwarded after `subprotocols` and the
//! JWT entry (`jwt_from = "subprotocol"`) are taken out, and whether the
//! upstream's selection is one of the names it was offered. Pure functions
//! of header values, no I/O (leaf).

use http::header::SEC_WEBSOCKET_PROTOCOL;
use http::{HeaderMap, HeaderValue};

use crate::config::{is_token, HandshakePolicy, TokenSource};

/// Why an offer is refused (400 `subprotocol`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BadOffer {
    /// An entry that is not a token, or a header that is not text.
    Malformed,
    /// `require_subprotocol`, and none of `subprotocols` was offered.
    NoneAllowed,
    /// The JWT entry was all that was left: a browser fails a handshake in
    /// which the server selects none of its offers.
    OnlyTheToken,
    /// Two entries start with the JWT prefix.
    TwoTokens,
}

/// What goes to the upstream in place of the client's
/// `Sec-WebSocket-Protocol` headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Forward {
    /// The client's headers, untouched (no policy applies).
    AsOffered,
    /// One header with these entries (in the client's order), or none at
    /// all when empty.
    Only(Vec<String>),
}

/// Judges the offer in `headers` against the policy and the JWT's place.
///
/// # Errors
/// [`BadOffer`]: an unreadable offer, or none left that could be selected.
pub(crate) fn screen(
    policy: &HandshakePolicy,
    jwt_from: &TokenSource,
    headers: &HeaderMap,
) -> Result<Forward, BadOffer> {
    let prefix = match jwt_from {
        TokenSource::Subprotocol(p) => Some(p.as_str()),
        _ => None,
    };
    if policy.subprotocols.is_empty() && prefix.is_none() {
        return Ok(Forward::AsOffered);
    }
    let mut kept = Vec::new();
    let mut tokens = 0;
    for entry in offered(headers) {
        let entry = entry.ok_or(BadOffer::Malformed)?;
        if prefix.is_some_and(|p| entry.starts_with(p)) {
            tokens += 1;
            continue;
        }
        if policy.subprotocols.is_empty() || policy.subprotocols.iter().any(|s| s == entry) {
            kept.push(entry.to_owned());
        }
    }
    if tokens > 1 {
        return Err(BadOffer::TwoTokens);
    }
    if kept.is_empty() {
        if policy.require_subprotocol {
            return Err(BadOffer::NoneAllowed);
        }
        if tokens == 1 {
            return Err(BadOffer::OnlyTheToken);
        }
    }
    Ok(Forward::Only(kept))
}

impl Forward {
    /// The one `Sec-WebSocket-Protocol` value the upstream gets instead of
    /// the client's, its entries in order (none: no header); `None` when the
    /// client's go as they are.
    pub(crate) fn rewritten(&self) -> Option<&[String]> {
        match self {
            Forward::AsOffered => None,
            Forward::Only(kept) => Some(kept),
        }
    }
}

/// The entries of every `Sec-WebSocket-Protocol` header, in order; `None`
/// for one that is not a token (or a header that is not text).
pub(crate) fn offered(headers: &HeaderMap) -> impl Iterator<Item = Option<&str>> {
    headers
        .get_all(SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .flat_map(|v| match v.to_str() {
            Ok(text) => Box::new(
                text.split(',')
                    .map(str::trim)
                    .filter(|e| !e.is_empty())
                    .map(|e| is_token(e).then_some(e)),
            ) as Box<dyn Iterator<Item = Option<&str>>>,
            Err(_) => Box::new(std::iter::once(None)),
        })
}

/// The subprotocol wsgate selects when it answers a handshake itself (a
/// close-mode refusal): the first name the upstream would have been offered,
/// never the JWT entry; `None` when there is none. Browsers (and Node's `ws`)
/// fail a 101 that selects nothing after they offered something, so a page
/// would read 1006 instead of the Close that follows.
pub(crate) fn own_selection(
    policy: &HandshakePolicy,
    jwt_from: &TokenSource,
    headers: &HeaderMap,
) -> Option<HeaderValue> {
    match screen(policy, jwt_from, headers).ok()? {
        Forward::AsOffered => HeaderValue::from_str(offered(headers).next()??).ok(),
        Forward::Only(kept) => HeaderValue::from_str(kept.first()?).ok(),
    }
}

/// Whether the upstream's 101 selects nothing, or exactly one of the names
/// it was offered: `selected` is its `Sec-WebSocket-Protocol` (`Err` for
/// several lines), `forward` what became of the client's offer in `request`.
pub(crate) fn selection_is_offered(
    selected: Result<Option<&[u8]>, ()>,
    forward: &Forward,
    request: &HeaderMap,
) -> bool {
    let name = match selected {
        Ok(None) => return true,
        Err(()) => return false,
        Ok(Some(value)) => value.trim_ascii(),
    };
    let Ok(name) = std::str::from_utf8(name) else {
        return false;
    };
    is_token(name)
        && match forward {
            Forward::AsOffered => offered(request).any(|e| e == Some(name)),
            Forward::Only(kept) => kept.iter().any(|k| k == name),
        }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(
                SEC_WEBSOCKET_PROTOCOL,
                HeaderValue::from_str(v).expect("value"),
            );
        }
        h
    }

    fn policy(names: &[&str], require: bool) -> HandshakePolicy {
        HandshakePolicy {
            subprotocols: names.iter().map(|n| (*n).to_owned()).collect(),
            require_subprotocol: require,
            ..HandshakePolicy::default()
        }
    }

    const BEARER: &str = "base64url.bearer.authorization.k8s.io.";

    fn token_source() -> TokenSource {
        TokenSource::Subprotocol(BEARER.into())
    }

    fn only(names: &[&str]) -> Forward {
        Forward::Only(names.iter().map(|n| (*n).to_owned()).collect())
    }

    #[test]
    fn without_a_policy_the_offer_passes_untouched() {
        let h = headers(&["chat, superchat"]);
        let no_jwt = TokenSource::Query("t".into());
        assert_eq!(
            screen(&policy(&[], false), &no_jwt, &h),
            Ok(Forward::AsOffered)
        );
    }

    #[test]
    fn names_outside_the_list_are_removed_in_order() {
        let h = headers(&["v2.chat, other", "v1.chat"]);
        let forward = screen(&policy(&["v1.chat", "v2.chat"], false), &token_source(), &h);
        assert_eq!(forward, Ok(only(&["v2.chat", "v1.chat"])));
        let kept = ["v2.chat".to_owned(), "v1.chat".to_owned()];
        assert_eq!(forward.expect("kept").rewritten(), Some(&kept[..]));
        assert_eq!(Forward::AsOffered.rewritten(), None);
    }

    #[test]
    fn require_refuses_an_offer_without_a_listed_name() {
        let p = policy(&["chat"], true);
        let none = TokenSource::Query("t".into());
        assert_eq!(
            screen(&p, &none, &headers(&["other"])),
            Err(BadOffer::NoneAllowed)
        );
        assert_eq!(screen(&p, &none, &headers(&[])), Err(BadOffer::NoneAllowed));
        assert_eq!(
            screen(&p, &none, &headers(&["other, chat"])),
            Ok(only(&["chat"]))
        );
        assert_eq!(
            screen(&policy(&["chat"], false), &none, &headers(&["other"])),
            Ok(only(&[])),
            "without require: forwarded with no subprotocol"
        );
    }

    #[test]
    fn the_token_entry_is_taken_out_and_never_forwarded() {
        let jwt = format!("{BEARER}eyJhbGciOiJIUzI1NiJ9.e30.sig");
        let h = headers(&[&format!("chat, {jwt}")]);
        assert_eq!(
            screen(&policy(&[], false), &token_source(), &h),
            Ok(only(&["chat"]))
        );
        assert_eq!(
            screen(&policy(&[], false), &token_source(), &headers(&[&jwt])),
            Err(BadOffer::OnlyTheToken)
        );
        assert_eq!(
            screen(
                &policy(&[], false),
                &token_source(),
                &headers(&[&format!("chat, {jwt}, {jwt}x")])
            ),
            Err(BadOffer::TwoTokens)
        );
        assert_eq!(
            screen(&policy(&[], false), &token_source(), &headers(&["chat"])),
            Ok(only(&["chat"])),
            "no token entry: the key rule decides what a missing token means"
        );
    }

    #[test]
    fn malformed_offers_are_refused() {
        let p = policy(&["chat"], false);
        let none = TokenSource::Query("t".into());
        assert_eq!(
            screen(&p, &none, &headers(&["chat, a b"])),
            Err(BadOffer::Malformed)
        );
        let mut h = HeaderMap::new();
        h.append(
            SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_bytes(b"chat\xff").expect("opaque"),
        );
        assert_eq!(screen(&p, &none, &h), Err(BadOffer::Malformed));
    }

    #[test]
    fn wsgate_selects_the_first_forwarded_name_never_the_token() {
        let jwt = format!("{BEARER}eyJhbGciOiJIUzI1NiJ9.e30.sig");
        let none = TokenSource::Query("t".into());
        let pick = |p: &HandshakePolicy, from: &TokenSource, offer: &str| {
            own_selection(p, from, &headers(&[offer])).map(|v| v.as_bytes().to_vec())
        };
        assert_eq!(
            pick(&policy(&[], false), &none, "a, b"),
            Some(b"a".to_vec())
        );
        assert_eq!(
            pick(&policy(&["b"], false), &none, "a, b"),
            Some(b"b".to_vec())
        );
        assert_eq!(
            pick(
                &policy(&[], false),
                &token_source(),
                &format!("{jwt}, chat")
            ),
            Some(b"chat".to_vec())
        );
        assert_eq!(
            own_selection(&policy(&[], false), &none, &headers(&[])),
            None
        );
    }

    #[test]
    fn the_upstream_may_select_only_what_it_was_offered() {
        // Offered as the client made it, or as the policy rewrote it.
        let request = headers(&["chat, superchat"]);
        let rewritten = only(&["chat", "superchat"]);
        for (forward, request) in [
            (&Forward::AsOffered, &request),
            (&rewritten, &headers(&["other, chat, superchat"])),
        ] {
            let offered = |answer: Option<&str>| {
                selection_is_offered(Ok(answer.map(str::as_bytes)), forward, request)
            };
            assert!(offered(None));
            assert!(offered(Some("superchat")));
            assert!(!offered(Some("other")));
            assert!(!offered(Some("chat, superchat")));
            assert!(!offered(Some("Chat")));
            assert!(
                !selection_is_offered(Err(()), forward, request),
                "two lines"
            );
        }
        assert!(!selection_is_offered(
            Ok(Some(b"chat")),
            &Forward::AsOffered,
            &headers(&[])
        ));
        assert!(!selection_is_offered(
            Ok(Some(b"chat")),
            &only(&[]),
            &request
        ));
    }
}
