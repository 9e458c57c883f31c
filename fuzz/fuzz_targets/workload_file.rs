//! The static workload file (`workload::Table`): any text parses or is refused without a panic, and
//! lookups in a parsed file keep the rule that protects it: a cgroup created below one that matched
//! an entry has that entry's workload, whatever it is named.
//! Input: `<file text>\0<cgroup path>\0<child cgroup name>`.

#![no_main]

use std::{path::Path, sync::Arc};

use interceptor::{identity::CgroupPath, workload::Table};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut parts = text.split('\0');
    let file = parts.next().unwrap_or_default();
    let Ok(table) = Table::parse(Path::new("fuzz.toml"), file) else {
        return;
    };
    let cgroup = CgroupPath::new(parts.next().unwrap_or_default());
    let child = parts.next().unwrap_or_default().replace('/', "");
    let Some(workload) = table.lookup(&cgroup) else {
        return;
    };
    if cgroup.as_str().is_empty() || child.is_empty() {
        return;
    }
    let below = CgroupPath::new(&format!("{cgroup}/{child}"));
    let found = table.lookup(&below);
    assert!(
        found.as_ref().is_some_and(|found| Arc::ptr_eq(found, &workload)),
        "{below} left {workload:?} for {found:?}"
    );
});
