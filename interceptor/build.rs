//! Embeds the BPF object built by `cargo xtask build-ebpf`. Without one, the agent still builds (so
//! `cargo build`, `cargo test` and `cargo clippy` need neither nightly nor bpf-linker) and says at run time
//! how to get it.

use std::{env, fs, path::PathBuf};

fn main() {
    println!("cargo:rerun-if-env-changed=INTERCEPTOR_EBPF_OBJECT");
    println!("cargo:rerun-if-env-changed=CARGO_TARGET_DIR");
    let object = env::var_os("INTERCEPTOR_EBPF_OBJECT")
        .map(PathBuf::from)
        .unwrap_or_else(default_object_path);
    println!("cargo:rerun-if-changed={}", object.display());

    let embedded =
        PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR")).join("interceptor-ebpf.o");
    match fs::read(&object) {
        Ok(bytes) => fs::write(&embedded, bytes),
        // An empty object is the marker `bpf::Interceptor::attach` turns into its "run build-ebpf" error.
        Err(_) => fs::write(&embedded, []),
    }
    .expect("write the embedded BPF object into OUT_DIR");
    println!("cargo:rustc-env=INTERCEPTOR_EBPF_EMBEDDED={}", embedded.display());
}

fn default_object_path() -> PathBuf {
    let target_dir = env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"))
                .join("../target")
        });
    target_dir.join("bpfel-unknown-none/release/interceptor-ebpf")
}
