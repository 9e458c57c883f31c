use super::*;

#[test]
fn session_names_keep_the_pod_whole() {
    assert_eq!(session_name("team", "web-7d9f-x2"), "team.web-7d9f-x2");
    let long_namespace = "n".repeat(63);
    let pod = "web-7d9f8c-abcde";
    let name = session_name(&long_namespace, pod);
    assert_eq!(name.len(), 64);
    assert!(name.ends_with(".web-7d9f8c-abcde"), "{name}");
    let long_pod = "p".repeat(70);
    assert_eq!(session_name("team", &long_pod), "p".repeat(64));
    assert_eq!(session_name("", "web"), "web");
}
