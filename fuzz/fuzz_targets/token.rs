//! IMDSv2 tokens (`imds::token`): any bytes offered as a token are refused without a panic, a minted
//! token works for its cgroup only, and any TTL header gives a TTL within EC2's limits or an error.
//! Input: cgroup id, now and TTL as three big-endian u64 (24 bytes), then the token or header bytes.

#![no_main]

use std::{
    sync::LazyLock,
    time::{Duration, UNIX_EPOCH},
};

use interceptor::imds::token::{MAX_TTL, TokenError, TokenKey, parse_ttl};
use interceptor_common::CgroupId;
use libfuzzer_sys::fuzz_target;

static KEY: LazyLock<TokenKey> = LazyLock::new(TokenKey::random);

fuzz_target!(|data: &[u8]| {
    let Some((header, rest)) = data.split_first_chunk::<24>() else {
        return;
    };
    let field = |index: usize| u64::from_be_bytes(header[index * 8..][..8].try_into().unwrap());
    let cgroup = CgroupId(field(0));
    let Some(now) = UNIX_EPOCH.checked_add(Duration::from_secs(field(1))) else {
        return;
    };
    let ttl = Duration::from_secs(field(2));

    if let Ok(parsed) = parse_ttl(Some(rest)) {
        assert!(!parsed.is_zero() && parsed <= MAX_TTL, "{parsed:?}");
    }
    assert!(KEY.verify(rest, cgroup, now).is_err(), "forged token accepted");

    let token = KEY.mint(cgroup, ttl, now);
    let own = KEY.verify(token.as_bytes(), cgroup, now);
    assert!(matches!(own, Ok(()) | Err(TokenError::Expired)), "{own:?}");
    let other = CgroupId(cgroup.0.wrapping_add(1));
    assert_eq!(
        KEY.verify(token.as_bytes(), other, now),
        Err(TokenError::NotYours)
    );
});
