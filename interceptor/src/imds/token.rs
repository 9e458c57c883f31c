//! imds::token: IMDSv2 session tokens bound to the cgroup that asked for them. A token is its expiry and
//! an HMAC of (cgroup id, expiry) under a key born with the agent, so the agent keeps no table of tokens
//! and a token minted for one workload fails for every other.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use hmac::{Hmac, Mac};
use interceptor_common::CgroupId;
use sha2::Sha256;

/// The longest session EC2 grants: six hours.
pub const MAX_TTL: Duration = Duration::from_secs(21_600);

/// Why a token is refused (the status is 401 for each).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("the token is malformed")]
    Malformed,
    #[error("the token has expired")]
    Expired,
    #[error("the token was issued to another caller")]
    NotYours,
}

/// Why a TTL header is refused (400).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("X-aws-ec2-metadata-token-ttl-seconds must be a whole number of seconds from 1 to 21600")]
pub struct BadTtl;

/// Parses the `X-aws-ec2-metadata-token-ttl-seconds` request header.
pub fn parse_ttl(value: Option<&[u8]>) -> Result<Duration, BadTtl> {
    let text = std::str::from_utf8(value.ok_or(BadTtl)?).map_err(|_| BadTtl)?;
    let seconds: u64 = text.trim().parse().map_err(|_| BadTtl)?;
    let ttl = Duration::from_secs(seconds);
    (1..=MAX_TTL.as_secs())
        .contains(&seconds)
        .then_some(ttl)
        .ok_or(BadTtl)
}

/// The key tokens are signed with. Random per agent process: a restart invalidates tokens, and the
/// SDKs fetch a new one on the 401.
pub struct TokenKey {
    key: [u8; 32],
}

const TAG_LEN: usize = 32;

impl TokenKey {
    pub fn random() -> Self {
        let mut key = [0u8; 32];
        getrandom::fill(&mut key).expect("the kernel's random source is available");
        Self { key }
    }

    /// A token for `cgroup_id`, valid for `ttl` from `now`.
    pub fn mint(&self, cgroup_id: CgroupId, ttl: Duration, now: SystemTime) -> String {
        let expires = unix_seconds(now).saturating_add(ttl.as_secs());
        let mut bytes = expires.to_be_bytes().to_vec();
        bytes.extend_from_slice(&self.tag(cgroup_id, expires));
        URL_SAFE_NO_PAD.encode(bytes)
    }

    /// Accepts a token minted for `cgroup_id` that has not expired at `now`.
    pub fn verify(&self, token: &[u8], cgroup_id: CgroupId, now: SystemTime) -> Result<(), TokenError> {
        let bytes = URL_SAFE_NO_PAD.decode(token).map_err(|_| TokenError::Malformed)?;
        let (expires, tag) = bytes.split_at_checked(8).ok_or(TokenError::Malformed)?;
        if tag.len() != TAG_LEN {
            return Err(TokenError::Malformed);
        }
        let expires = u64::from_be_bytes(expires.try_into().expect("split at 8"));
        self.mac(cgroup_id, expires)
            .verify_slice(tag)
            .map_err(|_| TokenError::NotYours)?;
        if unix_seconds(now) >= expires {
            return Err(TokenError::Expired);
        }
        Ok(())
    }

    fn tag(&self, cgroup_id: CgroupId, expires: u64) -> [u8; TAG_LEN] {
        self.mac(cgroup_id, expires).finalize().into_bytes().into()
    }

    fn mac(&self, cgroup_id: CgroupId, expires: u64) -> Hmac<Sha256> {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.key).expect("HMAC takes any key length");
        mac.update(b"interceptor imds token v1");
        mac.update(&cgroup_id.0.to_be_bytes());
        mac.update(&expires.to_be_bytes());
        mac
    }
}

fn unix_seconds(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs()
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: CgroupId = CgroupId(4242);
    const B: CgroupId = CgroupId(4243);

    #[test]
    fn a_token_works_for_its_cgroup_until_it_expires() {
        let key = TokenKey::random();
        let now = SystemTime::now();
        let token = key.mint(A, Duration::from_secs(60), now);
        assert_eq!(key.verify(token.as_bytes(), A, now), Ok(()));
        assert_eq!(
            key.verify(token.as_bytes(), A, now + Duration::from_secs(59)),
            Ok(())
        );
        assert_eq!(
            key.verify(token.as_bytes(), A, now + Duration::from_secs(61)),
            Err(TokenError::Expired)
        );
    }

    #[test]
    fn a_token_is_refused_for_another_cgroup_and_under_another_key() {
        let key = TokenKey::random();
        let now = SystemTime::now();
        let token = key.mint(A, Duration::from_secs(60), now);
        assert_eq!(key.verify(token.as_bytes(), B, now), Err(TokenError::NotYours));
        assert_eq!(
            TokenKey::random().verify(token.as_bytes(), A, now),
            Err(TokenError::NotYours)
        );
    }

    #[test]
    fn forged_expiry_and_garbage_are_refused() {
        let key = TokenKey::random();
        let now = SystemTime::now();
        let token = key.mint(A, Duration::from_secs(60), now);
        let mut bytes = URL_SAFE_NO_PAD.decode(&token).unwrap();
        bytes[7] ^= 1;
        let forged = URL_SAFE_NO_PAD.encode(bytes);
        assert_eq!(key.verify(forged.as_bytes(), A, now), Err(TokenError::NotYours));
        for garbage in ["", "not base64!", "AAAA", &token[..token.len() - 2]] {
            assert_eq!(
                key.verify(garbage.as_bytes(), A, now),
                Err(TokenError::Malformed),
                "{garbage:?}"
            );
        }
    }

    #[test]
    fn ttl_header_rules() {
        assert_eq!(parse_ttl(Some(b"21600")), Ok(MAX_TTL));
        assert_eq!(parse_ttl(Some(b"1")), Ok(Duration::from_secs(1)));
        for bad in [&b"0"[..], b"21601", b"-1", b"abc", b"", b"1.5"] {
            assert_eq!(parse_ttl(Some(bad)), Err(BadTtl), "{bad:?}");
        }
        assert_eq!(parse_ttl(None), Err(BadTtl));
    }
}
