//! The agent's handle owns the programs: attaching shows them on the cgroup root, dropping the handle
//! leaves none there, as the kernel reports it.

use interceptor::bpf::Interceptor;
use interceptor_tests::{kernel, privileged, sim::SimNode};

#[tokio::test(flavor = "multi_thread")]
async fn dropping_the_handle_detaches_every_program() -> anyhow::Result<()> {
    if !privileged::can_run("detach") {
        return Ok(());
    }
    let node = SimNode::new()?;
    let root = node.kubepods().to_path_buf();
    let attached = |root: &std::path::Path| -> anyhow::Result<Vec<Vec<u32>>> {
        kernel::AGENT_ATTACH_TYPES
            .iter()
            .map(|&attach_type| Ok(kernel::attached_programs(root, attach_type)?))
            .collect()
    };
    assert!(
        attached(&root)?.iter().all(Vec::is_empty),
        "nothing is attached before"
    );

    let interceptor = Interceptor::attach(&node.redirect_config())?;
    let while_attached = attached(&root)?;
    for (attach_type, ids) in kernel::AGENT_ATTACH_TYPES.iter().zip(&while_attached) {
        assert_eq!(ids.len(), 1, "one program at {attach_type:?}");
    }

    drop(interceptor);
    assert!(
        attached(&root)?.iter().all(Vec::is_empty),
        "programs remain after drop: {:?}",
        attached(&root)?
    );
    Ok(())
}
