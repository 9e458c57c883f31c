//! `cargo xtask bench`: builds the BPF object and runs the benchmarks (as root: they load the programs
//! into the real kernel). Each reports ratios against a baseline measured in the same run.

use anyhow::Result;

use crate::{
    build_ebpf,
    install::{ensure_commands, run_checked},
    test::TEST_COMMANDS,
};

pub fn run() -> Result<()> {
    ensure_commands(TEST_COMMANDS)?;
    build_ebpf::run()?;
    run_checked(build_ebpf::workspace_cargo().args([
        "bench",
        "--package",
        "interceptor-tests",
        "--bench",
        "connect",
    ]))
}
