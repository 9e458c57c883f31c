//! Installs the tools the build and the tests need, each only when missing, so every task can run on a
//! fresh machine and runs fast on a prepared one.

use std::{
    env, fs,
    os::unix::fs::symlink,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail, ensure};

/// The toolchain that compiles the BPF crate (`-Z build-std=core` needs nightly).
pub const NIGHTLY: &str = "nightly";
/// The bpf-linker release known to build against the nightly's LLVM 22 here.
const BPF_LINKER_VERSION: &str = "0.13.0";

/// Runs a command, failing with its command line when it cannot start or exits non-zero.
pub fn run_checked(command: &mut Command) -> Result<()> {
    let status = command
        .status()
        .with_context(|| format!("cannot run {command:?}"))?;
    ensure!(status.success(), "{command:?} failed: {status}");
    Ok(())
}

/// A command's standard output, or `None` when it cannot run or fails.
pub fn output(command: &mut Command) -> Option<String> {
    let out = command.output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// rust-src for the nightly toolchain, which `-Z build-std=core` compiles.
pub fn ensure_rust_src() -> Result<()> {
    let installed =
        output(Command::new("rustup").args(["component", "list", "--installed", "--toolchain", NIGHTLY]))
            .with_context(|| {
                format!("the {NIGHTLY} toolchain is needed to build the BPF crate; install it with rustup")
            })?;
    if installed.lines().any(|line| line.starts_with("rust-src")) {
        return Ok(());
    }
    println!("xtask: installing rust-src for {NIGHTLY}");
    run_checked(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", NIGHTLY]))
}

/// A target's standard library for the toolchain that runs xtask (the image's musl build needs one).
pub fn ensure_rust_target(target: &str) -> Result<()> {
    let installed = output(Command::new("rustup").args(["target", "list", "--installed"]))
        .context("cannot list rustup's installed targets")?;
    if installed.lines().any(|line| line.trim() == target) {
        return Ok(());
    }
    println!("xtask: installing the {target} target");
    run_checked(Command::new("rustup").args(["target", "add", target]))
}

/// bpf-linker, built against the nightly toolchain's own LLVM so the bitcode linker runs exactly the
/// LLVM that compiled the BPF crate. The crate's default feature wants a newer LLVM than the toolchain
/// ships, so it is built with the feature matching the toolchain's LLVM major version, and
/// `LLVM_PREFIX` points at a directory of symlinks to the toolchain's `libLLVM.so.*` (the
/// `libLLVM-*.so` beside it is a linker script, not a library).
pub fn ensure_bpf_linker() -> Result<()> {
    if output(Command::new("bpf-linker").arg("--version")).is_some() {
        return Ok(());
    }
    let sysroot = output(Command::new("rustc").args([&format!("+{NIGHTLY}"), "--print", "sysroot"]))
        .context("cannot find the nightly toolchain's sysroot")?;
    let llvm_lib = find_llvm_dylib(&Path::new(sysroot.trim()).join("lib"))?;
    let file_name = llvm_lib
        .file_name()
        .and_then(|name| name.to_str())
        .context("odd libLLVM name")?;
    let major = llvm_major_version(file_name).with_context(|| format!("no LLVM version in {file_name}"))?;

    // The binary keeps an rpath to this directory, so it lives under CARGO_HOME, not in a temp dir.
    let prefix = cargo_home()?.join("bpf-linker-llvm");
    let prefix_lib = prefix.join("lib");
    fs::create_dir_all(&prefix_lib).with_context(|| format!("cannot create {}", prefix_lib.display()))?;
    for link_name in ["libLLVM.so", file_name] {
        let link = prefix_lib.join(link_name);
        let _ = fs::remove_file(&link);
        symlink(&llvm_lib, &link).with_context(|| format!("cannot link {}", link.display()))?;
    }
    println!("xtask: building bpf-linker {BPF_LINKER_VERSION} against LLVM {major} (about 3 minutes)");
    run_checked(
        Command::new("cargo")
            .args([
                "install",
                "bpf-linker",
                "--locked",
                "--version",
                BPF_LINKER_VERSION,
            ])
            .args(["--no-default-features", "--features", &format!("llvm-{major}")])
            .env("LLVM_PREFIX", &prefix)
            .env_remove("RUSTUP_TOOLCHAIN"),
    )
}

fn find_llvm_dylib(lib_dir: &Path) -> Result<PathBuf> {
    let entries = fs::read_dir(lib_dir).with_context(|| format!("cannot list {}", lib_dir.display()))?;
    for entry in entries {
        let path = entry?.path();
        if path
            .file_name()
            .and_then(|name| name.to_str())
            .is_some_and(|name| name.starts_with("libLLVM.so."))
        {
            return Ok(path);
        }
    }
    bail!(
        "no libLLVM.so.* in {}: is the nightly toolchain complete?",
        lib_dir.display()
    )
}

/// `libLLVM.so.22.1-rust-1.97.0-nightly` -> 22.
fn llvm_major_version(file_name: &str) -> Option<u32> {
    file_name
        .strip_prefix("libLLVM.so.")?
        .split('.')
        .next()?
        .parse()
        .ok()
}

fn cargo_home() -> Result<PathBuf> {
    if let Some(home) = env::var_os("CARGO_HOME") {
        return Ok(PathBuf::from(home));
    }
    let home = env::var_os("HOME").context("neither CARGO_HOME nor HOME is set")?;
    Ok(PathBuf::from(home).join(".cargo"))
}

/// The cargo-fuzz release the fuzz targets are built with.
const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// cargo-fuzz, which builds and runs the libFuzzer targets of `fuzz/`.
pub fn ensure_cargo_fuzz() -> Result<()> {
    if output(Command::new("cargo").args(["fuzz", "--version"])).is_some() {
        return Ok(());
    }
    println!("xtask: installing cargo-fuzz {CARGO_FUZZ_VERSION} (about a minute)");
    run_checked(
        Command::new("cargo")
            .args([
                "install",
                "cargo-fuzz",
                "--locked",
                "--version",
                CARGO_FUZZ_VERSION,
            ])
            .env_remove("RUSTUP_TOOLCHAIN"),
    )
}

/// Debian packages whose commands the tests run, installed with apt when a command (a name on PATH,
/// or an absolute path to an executable) is missing.
pub fn ensure_commands(commands_and_packages: &[(&str, &str)]) -> Result<()> {
    let mut missing: Vec<&str> = commands_and_packages
        .iter()
        .filter(|(command, _)| {
            output(Command::new("sh").args(["-c", &format!("command -v {command}")])).is_none()
        })
        .map(|(_, package)| *package)
        .collect();
    // One package may provide several of the commands.
    missing.sort_unstable();
    missing.dedup();
    if missing.is_empty() {
        return Ok(());
    }
    println!("xtask: installing {}", missing.join(" "));
    run_checked(Command::new("apt-get").arg("update"))?;
    run_checked(
        Command::new("apt-get")
            .args(["install", "-y", "--no-install-recommends"])
            .args(&missing),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_llvm_major_version_from_the_toolchain_library() {
        assert_eq!(
            llvm_major_version("libLLVM.so.22.1-rust-1.97.0-nightly"),
            Some(22)
        );
        assert_eq!(llvm_major_version("libLLVM-22-rust-1.97.0-nightly.so"), None);
    }
}
