# benches/jwt-mint.sh — sourced by the bench scripts that send JWTs (key-rules.sh,
# handshake-policy.sh): `mint ALG KID` prints a compact JWS over {"sub":"bench-user","exp":4102444800}
# signed with the test keys of tests/fixtures/jwt (RS256 kid rsa-1, HS256 kid hs-1).
# Not a script of its own. The sourcing script defines ROOT.
FIX="$ROOT/tests/fixtures/jwt"

b64url() { basenc --base64url -w0 | tr -d '='; }
mint() { # ALG KID -> a compact JWS over {"sub":"bench-user","exp":4102444800}
    local h p sig
    h="$(printf '{"alg":"%s","typ":"JWT","kid":"%s"}' "$1" "$2" | b64url)"
    p="$(printf '{"sub":"bench-user","exp":4102444800}' | b64url)"
    case "$1" in
        RS256) sig="$(printf '%s.%s' "$h" "$p" | openssl dgst -sha256 -sign "$FIX/rsa.pem" -binary | b64url)" ;;
        # the secret is the file's characters, not the bytes they spell (fixtures README)
        HS256) sig="$(printf '%s.%s' "$h" "$p" | openssl dgst -sha256 -hmac "$(cat "$FIX/hs256.secret")" -binary | b64url)" ;;
        *) echo "jwt-mint.sh: no minting for $1" >&2; return 1 ;;
    esac
    printf '%s.%s.%s' "$h" "$p" "$sig"
}
