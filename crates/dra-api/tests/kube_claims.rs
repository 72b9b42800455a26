//! `KubeClaims` against the API-server emulator: kube-rs reading
//! `resource.k8s.io/v1` ResourceClaims as from a real API server.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic

use apiserver_emulator::{ApiServer, Fault};
use dra_api::*;

fn client(api: &ApiServer) -> kube::Client {
    kube::Client::try_from(kube::Config::new(api.url().parse().unwrap())).unwrap()
}

fn claim(name: &str, uid: &str) -> ClaimRef {
    ClaimRef {
        namespace: "team-a".into(),
        name: name.into(),
        uid: uid.into(),
    }
}

#[tokio::test]
async fn claims_are_read_by_name_checked_by_uid_and_their_results_returned() {
    let api = ApiServer::start().await.unwrap();
    let claims = KubeClaims::new(client(&api));
    let spec = serde_json::json!({"devices": {"requests": [{"name": "gpu", "exactly": {"deviceClassName": "gpu.intel.com"}}]}});
    let uid = api.create_resource_claim("team-a", "gpu", spec.clone());

    let e = claims.allocation(&claim("gpu", &uid)).await.unwrap_err();
    assert!(matches!(e, ClaimError::NotAllocated { .. }), "{e}");

    assert!(api.allocate_resource_claim(
        "team-a",
        "gpu",
        &[
            ("gpu", "gpu.intel.com", "node-0", "0000-03-00-0-0x56c0"),
            ("nic", "nic.example.com", "node-0", "eth1")
        ],
    ));
    let results = claims.allocation(&claim("gpu", &uid)).await.unwrap();
    assert_eq!(
        results,
        [
            AllocationResult {
                request: "gpu".into(),
                driver: "gpu.intel.com".into(),
                pool: "node-0".into(),
                device: "0000-03-00-0-0x56c0".into(),
            },
            AllocationResult {
                request: "nic".into(),
                driver: "nic.example.com".into(),
                pool: "node-0".into(),
                device: "eth1".into(),
            },
        ]
    );

    let e = claims
        .allocation(&claim("gpu", "some-other-uid"))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("deleted and re-created"), "{e}");
    let e = claims.allocation(&claim("nope", "x")).await.unwrap_err();
    assert_eq!(
        e,
        ClaimError::NotFound {
            namespace: "team-a".into(),
            name: "nope".into()
        }
    );
    // Deleted and re-created under the same name: another object.
    api.delete_resource_claim("team-a", "gpu");
    let new_uid = api.create_resource_claim("team-a", "gpu", spec);
    assert_ne!(new_uid, uid);
    let e = claims.allocation(&claim("gpu", &uid)).await.unwrap_err();
    assert!(matches!(e, ClaimError::Replaced { .. }), "{e}");
    // An API server that fails: a retryable error naming the claim.
    api.inject(&[
        Fault::Internal,
        Fault::Internal,
        Fault::Internal,
        Fault::Internal,
    ]);
    let e = claims
        .allocation(&claim("gpu", &new_uid))
        .await
        .unwrap_err();
    assert!(
        matches!(e, ClaimError::Unavailable { .. }) && e.to_string().contains("team-a/gpu"),
        "{e}"
    );
}
