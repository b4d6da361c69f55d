//! The instance registry on both backends: leases, claims and their epochs.

// Test code: a failed expectation should panic with its message.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use relay_store::testing::TestDatabase;
use relay_store::{Backend, ClaimListener, Claimed};

both_backends!(
    leases_are_renewed_listed_and_ended,
    claims_grow_the_epoch_and_release_only_their_own,
);

async fn leases_are_renewed_listed_and_ended(db: &TestDatabase) {
    let store = &db.store;
    let until = store
        .renew_instance_lease("edge-a", "10.0.0.1:7444", 10_000)
        .await
        .unwrap();
    assert!(until > store.now());
    store
        .renew_instance_lease("edge-b", "10.0.0.2:7444", 10_000)
        .await
        .unwrap();
    // Renewing moves the lease and the address, not the start.
    let first = store.list_instances().await.unwrap();
    store
        .renew_instance_lease("edge-a", "10.0.0.9:7444", 20_000)
        .await
        .unwrap();
    let instances = store.list_instances().await.unwrap();
    assert_eq!(instances.len(), 2);
    let a = instances.iter().find(|i| i.id == "edge-a").unwrap();
    assert_eq!(a.peer_address, "10.0.0.9:7444");
    assert_eq!(
        a.started_at,
        first.iter().find(|i| i.id == "edge-a").unwrap().started_at
    );
    assert!(a.live);
    store.end_instance_lease("edge-b").await.unwrap();
    let instances = store.list_instances().await.unwrap();
    assert_eq!(
        instances
            .iter()
            .map(|i| (i.id.as_str(), i.live))
            .collect::<Vec<_>>(),
        vec![("edge-a", true), ("edge-b", false)],
        "live instances first"
    );
}

async fn claims_grow_the_epoch_and_release_only_their_own(db: &TestDatabase) {
    let store = &db.store;
    let tenant = store.create_tenant("acme").await.unwrap();
    let device = store.create_device(&tenant.id, "x1c").await.unwrap();
    store
        .renew_instance_lease("edge-a", "a:1", 10_000)
        .await
        .unwrap();
    store
        .renew_instance_lease("edge-b", "b:1", 10_000)
        .await
        .unwrap();
    let listener = ClaimListener::start(store).await.unwrap();
    assert_eq!(listener.is_some(), store.backend() == Backend::Postgres);

    assert_eq!(store.device_claim(&device.id).await.unwrap(), None);
    let first = store.claim_device(&device.id, "edge-a").await.unwrap();
    assert_eq!(first, 1);
    let claim = store.device_claim(&device.id).await.unwrap().unwrap();
    assert_eq!(claim.instance_id, "edge-a");
    assert_eq!(claim.peer_address.as_deref(), Some("a:1"));
    assert!(claim.is_live(store.now()));
    assert_eq!(
        store.claims_of("edge-a").await.unwrap(),
        vec![(device.id.clone(), 1)]
    );

    // The agent moves to edge-b: the epoch grows, edge-a's stale release
    // changes nothing.
    let second = store.claim_device(&device.id, "edge-b").await.unwrap();
    assert_eq!(second, 2);
    assert!(
        !store
            .release_device(&device.id, "edge-a", first)
            .await
            .unwrap()
    );
    assert_eq!(store.claims_of("edge-a").await.unwrap(), vec![]);
    let claim = store.device_claim(&device.id).await.unwrap().unwrap();
    assert_eq!((claim.instance_id.as_str(), claim.epoch), ("edge-b", 2));
    assert!(claim.is_live(store.now()));

    // An owner whose lease ended routes nowhere.
    store.end_instance_lease("edge-b").await.unwrap();
    let claim = store.device_claim(&device.id).await.unwrap().unwrap();
    assert!(!claim.is_live(store.now() + 1));

    // Its own release counts, once.
    assert!(
        store
            .release_device(&device.id, "edge-b", second)
            .await
            .unwrap()
    );
    assert!(
        !store
            .release_device(&device.id, "edge-b", second)
            .await
            .unwrap()
    );
    let claim = store.device_claim(&device.id).await.unwrap().unwrap();
    assert!(claim.released_at.is_some());
    assert!(claim.last_served(store.now()) <= store.now());

    if let Some(mut listener) = listener {
        // Both claims were announced, in order.
        for expected in [("edge-a", 1), ("edge-b", 2)] {
            let claimed = tokio::time::timeout(std::time::Duration::from_secs(5), listener.next())
                .await
                .expect("a claim announced")
                .unwrap();
            assert_eq!(
                claimed,
                Claimed {
                    device_id: device.id.clone(),
                    epoch: expected.1,
                    instance_id: expected.0.into(),
                }
            );
        }
    }
}

mod agent_checks {
    use std::time::Duration;

    use relay_store::testing::TestDatabase;
    use relay_store::{AgentAuthFailure, AgentAuthenticator, CheckedBy};

    crate::both_backends!(agent_credential_checks_are_cached_until_forgotten);

    async fn agent_credential_checks_are_cached_until_forgotten(db: &TestDatabase) {
        let store = &db.store;
        let tenant = store.create_tenant("acme").await.unwrap();
        let device = store.create_device(&tenant.id, "cc2").await.unwrap();
        let (info, credential) = store.issue_agent_credential(&device.id).await.unwrap();
        let token = credential.reveal();
        let checks = AgentAuthenticator::new(store.clone(), Duration::from_secs(60));
        assert_eq!(
            checks.verify(&token).await.unwrap(),
            (Ok(device.id.clone()), CheckedBy::Store)
        );
        assert_eq!(
            checks.verify(&token).await.unwrap(),
            (Ok(device.id.clone()), CheckedBy::Cache)
        );
        // A malformed token is refused without a query.
        assert_eq!(
            checks.verify("rla_not_a_credential").await.unwrap().0,
            Err(AgentAuthFailure::Malformed)
        );
        // Revoked (rotated): the revocation path forgets it, the store
        // refuses it.
        store.rotate_agent_credential(&device.id).await.unwrap();
        checks.forget(Some(&info.id));
        assert_eq!(
            checks.verify(&token).await.unwrap(),
            (Err(AgentAuthFailure::Revoked), CheckedBy::Store)
        );
    }
}
