//! Guest records of the previous metadata format, from the fixtures that
//! `scripts/gen-upgrade-fixtures.sh` wrote with the previous release's
//! binary, filled in for a guest of this run.

use serde_json::Value;
use std::path::Path;

/// The fixture `tests/fixtures/upgrade/{which}-v{version}.json`.
pub fn fixture(which: &str, version: u32) -> String {
    let path = super::manifest_dir().join(format!("tests/fixtures/upgrade/{which}-v{version}.json"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// `fixture` with its placeholders replaced by what this run's record
/// `current` (of the guest in `guest_dir`, declared with `image`) says:
/// the record the previous release would have written for this guest.
pub fn fill(fixture: &str, current: &Value, guest_dir: &Path, image: &str) -> String {
    let id = current["id"].as_str().expect("an id");
    let mut text = fixture
        .replace("@ID@", id)
        .replace("@GUEST_DIR@", &guest_dir.display().to_string())
        .replace("@IMAGE@", image)
        // The fixtures were written for the scenarios' instance `counter`.
        .replace("\"name\": \"counter\"", &format!("\"name\": {}", current["name"]));
    let vmm = &current["vmm"];
    if fixture.contains("@PID@") {
        assert!(vmm.is_object(), "the fixture names a VMM, the guest has none: {current}");
        text = text
            .replace("\"@PID@\"", &vmm["pid"].to_string())
            .replace("\"@PID_START_TIME@\"", &vmm["pid_start_time"].to_string())
            .replace("@VMM_VERSION@", vmm["version"].as_str().unwrap_or_default());
    }
    assert!(!text.contains('@'), "a placeholder left: {text}");
    let value: Value = serde_json::from_str(&text).expect("the filled fixture is JSON");
    assert_eq!(value["version"], 2, "a record of the previous format");
    text
}

/// Rewrites the record in `guest_dir` into the previous format from the
/// fixture `which`, keeping this guest's own values.
pub fn rewrite_as_previous(guest_dir: &Path, which: &str, image: &str) {
    let path = guest_dir.join("metadata.json");
    let current: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let old = fill(&fixture(which, 2), &current, guest_dir, image);
    std::fs::write(&path, old).unwrap();
}
