//! The `tessera` binary's contract: `check` validates and summarizes; bad configs exit non-zero
//! with a one-line reason and never a panic.

use std::process::Command;

fn tessera(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_tessera"))
        .args(args)
        .env_remove("TESSERA_CONFIG")
        .output()
        .expect("tessera runs")
}

#[test]
fn check_accepts_the_shipped_map() {
    let out = tessera(&["check", "--config", "shard-map.yaml"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("shard s0"), "{stdout}");
    assert!(stdout.contains("sharded     orders.user_id"), "{stdout}");
}

#[test]
fn bad_configs_exit_with_one_line_naming_the_problem() {
    let dir = tempfile::tempdir().expect("tempdir");
    let good = std::fs::read_to_string("shard-map.yaml").expect("shipped map");
    let cases = [
        ("typo", good.replace("  size: 20", "  sizee: 20"), "sizee"),
        (
            "zero pool",
            good.replace("  size: 20", "  size: 0"),
            "pool.size",
        ),
        (
            "bad addr",
            good.replace("\"127.0.0.1:5442\"", "\"localhost\""),
            "shards[1].primary",
        ),
        (
            "env",
            good.replace(
                "    password: app                 #",
                "    password: \"${TESSERA_TEST_UNSET_VAR}\" #",
            ),
            "TESSERA_TEST_UNSET_VAR",
        ),
        ("not yaml", "listen: [".to_string(), "bad.yaml"),
    ];
    for (name, text, needle) in cases {
        let path = dir.path().join("bad.yaml");
        std::fs::write(&path, text).expect("write");
        let out = tessera(&["check", "--config", path.to_str().expect("utf8 path")]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{name}: accepted");
        assert_eq!(out.status.code(), Some(1), "{name}: {stderr}");
        assert!(stderr.contains(needle), "{name}: {stderr}");
        assert_eq!(
            stderr.trim_end().lines().count(),
            1,
            "{name}: not one line: {stderr}"
        );
        assert!(!stderr.contains("panicked"), "{name}: {stderr}");
    }
    let out = tessera(&["check", "--config", "/nonexistent/map.yaml"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/map.yaml"));
}

#[test]
fn config_comes_from_the_environment_when_no_flag() {
    let out = Command::new(env!("CARGO_BIN_EXE_tessera"))
        .args(["check"])
        .env("TESSERA_CONFIG", "shard-map.yaml")
        .output()
        .expect("runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
