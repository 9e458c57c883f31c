//! Real AWS clients in simulated pods, unchanged, get their pod's own role from the agent: the AWS CLI,
//! boto3 and aws-sdk-rust, each through its default credential chain, with moto as STS.

use std::path::Path;

use interceptor_tests::{
    agent::ACCOUNT_ID,
    deployed::{DeployedNode, Sts, aws_cli_caller_arn, aws_client_env},
    lab::run,
    privileged, python,
    sim::{Pod, SimNode},
};

const SIM_CLIENT: &str = env!("CARGO_BIN_EXE_sim-client");

fn can_run(test: &str) -> bool {
    privileged::can_run(test) && privileged::has_python_tools(test)
}

/// The ARN moto reports for credentials of `role` (session name: the agent's default for the workload).
fn assumed_role_prefix(role: &str) -> String {
    format!("arn:aws:sts::{ACCOUNT_ID}:assumed-role/{role}/")
}

async fn boto3(pod: &Pod, container: &Path, moto_url: &str) -> anyhow::Result<String> {
    let home = tempfile::tempdir()?;
    let mut command = pod.command(container, python::tool("python3")?)?;
    aws_client_env(&mut command, home.path());
    command.args([
        "-c",
        "import sys, boto3\n\
         sts = boto3.client('sts', endpoint_url=sys.argv[1])\n\
         print(sts.get_caller_identity()['Arn'])",
        moto_url,
    ]);
    run(command).await
}

async fn aws_sdk_rust(pod: &Pod, container: &Path, moto_url: &str) -> anyhow::Result<String> {
    let home = tempfile::tempdir()?;
    let mut command = pod.command(container, SIM_CLIENT)?;
    aws_client_env(&mut command, home.path());
    command.args(["caller-identity", "--endpoint", moto_url]);
    run(command).await
}

#[tokio::test(flavor = "multi_thread")]
async fn aws_cli_boto3_and_aws_sdk_rust_get_each_pods_own_role() -> anyhow::Result<()> {
    if !can_run("clients") {
        return Ok(());
    }
    let mut node = SimNode::new()?;
    let (reader, writer) = (node.pod()?, node.pod()?);
    let (reader_container, writer_container) = (reader.container()?, writer.container()?);
    let t = DeployedNode::start(
        node,
        &[(reader.slice(), "reader"), (writer.slice(), "writer")],
        Sts::Moto,
        &[],
    )?;
    let moto = t.moto().url();

    for (pod, container, role) in [
        (&reader, &reader_container, "reader"),
        (&writer, &writer_container, "writer"),
    ] {
        let expected = assumed_role_prefix(role);
        let cli = aws_cli_caller_arn(pod, container, &moto).await?;
        assert!(cli.starts_with(&expected), "AWS CLI in the {role} pod: {cli}");
        let python = boto3(pod, container, &moto).await?;
        assert!(python.starts_with(&expected), "boto3 in the {role} pod: {python}");
        let rust = aws_sdk_rust(pod, container, &moto).await?;
        assert!(
            rust.starts_with(&expected),
            "aws-sdk-rust in the {role} pod: {rust}"
        );
    }
    // Every metadata request was answered by the agent: the stand-in saw none of them.
    assert_eq!(t.stand_in.metadata_paths(), Vec::<String>::new());
    // The agent's log (debug level) holds none of the secrets it served the clients.
    for (pod, container) in [(&reader, &reader_container), (&writer, &writer_container)] {
        t.agent
            .assert_no_secret_logged(&t.secrets_served_to(pod, container).await?);
    }
    Ok(())
}
