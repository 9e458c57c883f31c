//! Whether a privileged test can run here: as root with the BPF object embedded. With `CI` set a test
//! that cannot run fails loudly; elsewhere it is skipped with a message saying why.

/// `true` when the test should run; panics under CI when it cannot.
pub fn can_run(test: &str) -> bool {
    let missing = if unsafe_free_geteuid() != 0 {
        Some("root (CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN)")
    } else if !interceptor::bpf::object_embedded() {
        Some("the BPF object: run `cargo xtask build-ebpf` (or `cargo xtask test`)")
    } else {
        None
    };
    match missing {
        None => true,
        Some(what) if std::env::var_os("CI").is_some() => {
            panic!("{test}: privileged test cannot run under CI: needs {what}")
        }
        Some(what) => {
            eprintln!("skipping {test}: needs {what}");
            false
        }
    }
}

/// `true` when the Python tools (moto, the AWS CLI, boto3) are in the project's venv; panics under CI
/// when they are not.
pub fn has_python_tools(test: &str) -> bool {
    if crate::python::ready() {
        return true;
    }
    let why = format!(
        "the Python venv {} with moto, awscli and boto3: run `cargo xtask test`",
        crate::python::venv().display()
    );
    if std::env::var_os("CI").is_some() {
        panic!("{test}: cannot run under CI: needs {why}");
    }
    eprintln!("skipping {test}: needs {why}");
    false
}

fn unsafe_free_geteuid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}
