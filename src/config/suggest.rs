//! "Did you mean": the known key an unknown one was most likely meant to
//! be, for the error that stops wsgate (docs/configuration.md).
//!
//! Three ways a key goes wrong, tried in this order: the Helm chart's
//! camelCase spelling of a key (`maxClients`), a typo a couple of letters
//! off (`max_client`, `WSGATE_MAXCLIENTS`), and a key written without part
//! of its name (`redis_url` for `fleet_redis_url`). Nothing close: the
//! message lists every key instead.

/// What to tell the operator about an unknown key, after "unknown key K:".
/// `known` are the keys of the table the key was found in; `as_env` writes
/// the suggestion as the environment variable (`WSGATE_…`) it came as.
pub(super) fn advice(unknown: &str, known: &[&str], as_env: bool) -> String {
    let shown = |key: &str| {
        if as_env {
            format!("{}{}", super::ENV_PREFIX, key.to_ascii_uppercase())
        } else {
            key.to_owned()
        }
    };
    let snake = snake_case(unknown);
    if snake != unknown && known.contains(&snake.as_str()) {
        return format!(
            "keys are written in snake_case ({unknown} is the Helm chart's spelling): \
             did you mean {}?",
            shown(&snake)
        );
    }
    let candidates = nearest(&unknown.to_ascii_lowercase(), known);
    match candidates.as_slice() {
        [] if as_env => format!(
            "accepted keys are {}, each as {}<KEY IN UPPER CASE>",
            known.join(", "),
            super::ENV_PREFIX
        ),
        [] => format!("accepted keys are {}", known.join(", ")),
        [one] => format!("did you mean {}?", shown(one)),
        [first @ .., last] => format!(
            "did you mean {} or {}?",
            first
                .iter()
                .map(|k| shown(k))
                .collect::<Vec<_>>()
                .join(", "),
            shown(last)
        ),
    }
}

/// At most this many keys are offered; more are no suggestion at all.
const MAX_CANDIDATES: usize = 3;

/// The known keys closest to `unknown`: those at the smallest edit
/// distance, if it is small for the key's length; else those that contain
/// all of `unknown`'s `_`-separated words, in order.
fn nearest<'a>(unknown: &str, known: &[&'a str]) -> Vec<&'a str> {
    // One edit in five letters, at least one and at most three.
    let allowed = (unknown.chars().count() / 5).clamp(1, 3);
    let scored: Vec<(usize, &str)> = known
        .iter()
        .map(|k| (distance(unknown, k), *k))
        .filter(|(d, _)| *d <= allowed)
        .collect();
    if let Some(best) = scored.iter().map(|(d, _)| *d).min() {
        let at_best: Vec<&str> = scored
            .into_iter()
            .filter(|(d, _)| *d == best)
            .map(|(_, k)| k)
            .collect();
        if at_best.len() <= MAX_CANDIDATES {
            return at_best;
        }
        return Vec::new();
    }
    let words: Vec<&str> = unknown.split('_').filter(|w| !w.is_empty()).collect();
    if words.is_empty() {
        return Vec::new();
    }
    let containing: Vec<&str> = known
        .iter()
        .copied()
        .filter(|k| contains_in_order(k, &words))
        .collect();
    if containing.len() <= MAX_CANDIDATES {
        containing
    } else {
        Vec::new()
    }
}

/// Whether `key`'s `_`-separated words include `words`, in order.
fn contains_in_order(key: &str, words: &[&str]) -> bool {
    let mut parts = key.split('_');
    words.iter().all(|w| parts.any(|p| p == *w))
}

/// `maxClients` → `max_clients`; text without capitals is returned as it is.
fn snake_case(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 4);
    for c in text.chars() {
        if c.is_ascii_uppercase() {
            if !out.is_empty() && !out.ends_with('_') {
                out.push('_');
            }
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

/// Levenshtein distance: the fewest single-character insertions, deletions
/// and substitutions that turn `a` into `b`.
pub(super) fn distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let above = row[j + 1];
            row[j + 1] = if ca == *cb {
                diagonal
            } else {
                1 + diagonal.min(above).min(row[j])
            };
            diagonal = above;
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    const KNOWN: [&str; 9] = [
        "listen",
        "upstream",
        "max_clients",
        "max_clients_per_ip",
        "upstream_connect_timeout",
        "idle_timeout",
        "close_timeout",
        "fleet_redis_url",
        "fleet_timeout",
    ];

    #[test]
    fn edit_distance() {
        assert_eq!(distance("", ""), 0);
        assert_eq!(distance("max_client", "max_clients"), 1);
        assert_eq!(distance("maxclients", "max_clients"), 1);
        assert_eq!(distance("kitten", "sitting"), 3);
        assert_eq!(distance("abc", ""), 3);
    }

    #[test]
    fn a_close_key_is_suggested_alone() {
        for (unknown, as_env, says) in [
            ("max_client", false, "did you mean max_clients?"),
            ("max_client", true, "did you mean WSGATE_MAX_CLIENTS?"),
            ("maxclients", true, "did you mean WSGATE_MAX_CLIENTS?"),
            ("listn", false, "did you mean listen?"),
            ("upstrem", false, "did you mean upstream?"),
            ("redis_url", false, "did you mean fleet_redis_url?"),
            (
                "upstream_timeout",
                false,
                "did you mean upstream_connect_timeout?",
            ),
            (
                "maxClients",
                false,
                "(maxClients is the Helm chart's spelling): did you mean max_clients?",
            ),
            ("maxClientsPerIp", false, "did you mean max_clients_per_ip?"),
        ] {
            let a = advice(unknown, &KNOWN, as_env);
            assert!(a.contains(says), "{unknown}: {a}");
            assert!(!a.contains("accepted keys"), "{unknown}: {a}");
        }
    }

    #[test]
    fn nothing_close_lists_every_key_and_many_close_ones_are_no_suggestion() {
        for unknown in ["colour", "timeout", "x"] {
            let a = advice(unknown, &KNOWN, false);
            assert_eq!(
                a,
                format!("accepted keys are {}", KNOWN.join(", ")),
                "{unknown}"
            );
        }
        let a = advice("clients", &KNOWN, false);
        assert_eq!(a, "did you mean max_clients or max_clients_per_ip?", "{a}");
    }
}
