//! `cargo xtask fuzz`: runs every cargo-fuzz target of `fuzz/` for a while and prints how many inputs
//! each one ran; [`smoke`] is the short run `cargo xtask test` makes. Installs cargo-fuzz and a C++
//! compiler (libFuzzer is C++) when missing; the targets build with the nightly toolchain.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context, Result, bail};

use crate::{
    build_ebpf::{nightly_cargo, workspace_root},
    install::{ensure_cargo_fuzz, ensure_commands, output, run_checked},
};

#[derive(clap::Args)]
pub struct Options {
    /// How long each target runs, in seconds.
    #[arg(long, default_value_t = 60)]
    seconds: u64,
}

/// Seconds per target in `cargo xtask test`: enough to replay the corpus and the seeds and to catch a
/// shallow panic; finding deep ones is `cargo xtask fuzz`'s job.
const SMOKE_SECONDS: u64 = 5;

/// cargo-fuzz's default build (optimised, with debug assertions and overflow checks: an overflow is a
/// panic, and panics are what the targets hunt) without AddressSanitizer: the code under test is safe
/// Rust, and the sanitizer would slow the build and every run for nothing.
const FUZZ_BUILD_ARGS: &[&str] = &["build", "--sanitizer", "none"];

/// libfuzzer-sys compiles libFuzzer's C++ sources.
const FUZZ_COMMANDS: &[(&str, &str)] = &[("c++", "g++")];

/// libFuzzer's flags for every run, besides its directories and time limit: print the statistics this
/// task reads, and count an input that runs for seconds as a failure (a hang in the agent's request
/// path is a bug).
const LIBFUZZER_ARGS: &[&str] = &["-print_final_stats=1", "-timeout=10"];

pub fn run(options: &Options) -> Result<()> {
    fuzz_every_target(options.seconds)
}

/// A few seconds of every target, for `cargo xtask test`.
pub fn smoke() -> Result<()> {
    fuzz_every_target(SMOKE_SECONDS)
}

fn fuzz_every_target(seconds: u64) -> Result<()> {
    ensure_commands(FUZZ_COMMANDS)?;
    ensure_cargo_fuzz()?;
    let started = Instant::now();
    run_checked(fuzz_cargo().args(FUZZ_BUILD_ARGS))?;
    println!("xtask: fuzz targets built in {:.0?}", started.elapsed());
    let binaries = fuzz_dir().join("target").join(host_triple()?).join("release");
    for target in targets()? {
        let executions = fuzz_target(&binaries, &target, seconds)?;
        println!("xtask: fuzz {target}: {executions} executions in {seconds} s");
    }
    Ok(())
}

fn fuzz_dir() -> PathBuf {
    workspace_root().join("fuzz")
}

/// The triple cargo-fuzz builds for by default, which names the directory of the target binaries.
fn host_triple() -> Result<String> {
    let version = output(Command::new("rustc").arg("-vV")).context("cannot run `rustc -vV`")?;
    version
        .lines()
        .find_map(|line| line.strip_prefix("host: "))
        .map(str::to_owned)
        .context("`rustc -vV` names no host triple")
}

/// `cargo +nightly fuzz` in the workspace root, where cargo-fuzz finds `fuzz/`.
fn fuzz_cargo() -> Command {
    let mut command = nightly_cargo();
    command.arg("fuzz");
    command
}

/// The targets `fuzz/Cargo.toml` declares.
fn targets() -> Result<Vec<String>> {
    let list = output(fuzz_cargo().arg("list")).context("`cargo fuzz list` failed")?;
    Ok(list.split_whitespace().map(str::to_owned).collect())
}

/// Runs one target's binary for `seconds` and returns how many inputs it ran. (`cargo fuzz run` would
/// rebuild the agent crate first whenever its build script finds no BPF object to watch.) The target
/// reads its corpus (`fuzz/corpus/<target>`, which the run grows; not committed) and the committed
/// seeds (`fuzz/seeds/<target>`). A crash fails with the end of libFuzzer's report, which names the
/// input it saved under `fuzz/artifacts/<target>/`.
fn fuzz_target(binaries: &Path, target: &str, seconds: u64) -> Result<u64> {
    let corpus = fuzz_dir().join("corpus").join(target);
    let artifacts = fuzz_dir().join("artifacts").join(target);
    for dir in [&corpus, &artifacts] {
        fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let mut command = Command::new(binaries.join(target));
    command
        .arg(&corpus)
        // More corpus directories are only read: the seeds stay as committed.
        .args(existing_dir(&fuzz_dir().join("seeds").join(target)))
        .arg(format!("-artifact_prefix={}/", artifacts.display()))
        .arg(format!("-max_total_time={seconds}"))
        .args(LIBFUZZER_ARGS);
    let out = command
        .output()
        .with_context(|| format!("cannot run {command:?}"))?;
    let log = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        bail!(
            "fuzz target {target} failed ({}); the end of its log:\n{}",
            out.status,
            last_lines(&log, 60)
        );
    }
    executed_units(&log).with_context(|| {
        format!(
            "fuzz target {target} printed no final statistics; the end of its log:\n{}",
            last_lines(&log, 20)
        )
    })
}

fn existing_dir(dir: &Path) -> Option<&Path> {
    dir.is_dir().then_some(dir)
}

/// The count libFuzzer's `-print_final_stats=1` prints as `stat::number_of_executed_units: N`.
fn executed_units(log: &str) -> Option<u64> {
    log.lines()
        .find_map(|line| line.strip_prefix("stat::number_of_executed_units:"))?
        .trim()
        .parse()
        .ok()
}

fn last_lines(text: &str, count: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(count)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_executions_from_libfuzzers_final_stats() {
        let log = "Done 123 runs in 5 second(s)\n\
                   stat::number_of_executed_units: 4567\n\
                   stat::average_exec_per_sec:     913\n";
        assert_eq!(executed_units(log), Some(4567));
        assert_eq!(executed_units("INFO: Seed: 1\n"), None);
    }

    #[test]
    fn keeps_the_last_lines_of_a_log() {
        assert_eq!(last_lines("a\nb\nc", 2), "b\nc");
        assert_eq!(last_lines("a", 5), "a");
    }
}
