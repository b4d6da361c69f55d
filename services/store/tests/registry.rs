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
    assert!(!claim.is_live(store.now()));

    // An owner that drains releases what it still holds when it ends its
    // lease, in one transaction, and routes nowhere.
    let third = store.claim_device(&device.id, "edge-b").await.unwrap();
    let other = store.create_device(&tenant.id, "p1s").await.unwrap();
    store.claim_device(&other.id, "edge-b").await.unwrap();
    let before = store.queries();
    store.end_instance_lease("edge-b").await.unwrap();
    assert_eq!(store.queries() - before, 1, "one transaction");
    assert_eq!(store.claims_of("edge-b").await.unwrap(), vec![]);
    assert!(
        !store
            .release_device(&device.id, "edge-b", third)
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

mod agent_hello {
    use relay_store::testing::TestDatabase;
    use relay_store::{AgentAuthFailure, AgentClaim};

    crate::both_backends!(
        an_agents_hello_is_one_query_that_checks_and_claims,
        a_refused_agent_claims_nothing_and_is_told_why,
    );

    async fn an_agents_hello_is_one_query_that_checks_and_claims(db: &TestDatabase) {
        let store = &db.store;
        let tenant = store.create_tenant("acme").await.unwrap();
        let device = store.create_device(&tenant.id, "cc2").await.unwrap();
        let (_, credential) = store.issue_agent_credential(&device.id).await.unwrap();
        let token = credential.reveal();
        for (instance, epoch) in [("edge-a", 1), ("edge-a", 2), ("edge-b", 3)] {
            let before = store.queries();
            assert_eq!(
                store.accept_agent(&token, instance).await.unwrap(),
                Ok(AgentClaim {
                    device_id: device.id.clone(),
                    epoch
                })
            );
            assert_eq!(store.queries() - before, 1, "one query per HELLO");
            let claim = store.device_claim(&device.id).await.unwrap().unwrap();
            assert_eq!((claim.instance_id.as_str(), claim.epoch), (instance, epoch));
            assert_eq!(claim.released_at, None);
        }
    }

    async fn a_refused_agent_claims_nothing_and_is_told_why(db: &TestDatabase) {
        let store = &db.store;
        let tenant = store.create_tenant("acme").await.unwrap();
        let device = store.create_device(&tenant.id, "cc2").await.unwrap();
        let (_, credential) = store.issue_agent_credential(&device.id).await.unwrap();
        let token = credential.reveal();
        let claimed = || async {
            store
                .device_claim(&device.id)
                .await
                .unwrap()
                .map(|claim| claim.epoch)
        };

        // Malformed: no query at all.
        let before = store.queries();
        assert_eq!(
            store
                .accept_agent("rla_not_a_credential", "edge-a")
                .await
                .unwrap(),
            Err(AgentAuthFailure::Malformed)
        );
        assert_eq!(store.queries(), before);

        // A well-formed credential nobody issued, one of a deleted device,
        // and a rotated one.
        let unknown = relay_store::credential::IssuedCredential::generate(
            relay_store::credential::CredentialKind::AgentCredential,
        )
        .unwrap();
        assert_eq!(
            store
                .accept_agent(&unknown.reveal(), "edge-a")
                .await
                .unwrap(),
            Err(AgentAuthFailure::Unknown)
        );
        let other_device = store.create_device(&tenant.id, "x1c").await.unwrap();
        let (_, other) = store
            .issue_agent_credential(&other_device.id)
            .await
            .unwrap();
        store.delete_device(&other_device.id).await.unwrap();
        assert_eq!(
            store.accept_agent(&other.reveal(), "edge-a").await.unwrap(),
            Err(AgentAuthFailure::Revoked)
        );
        let rotated = store.rotate_agent_credential(&device.id).await.unwrap().1;
        assert_eq!(
            store.accept_agent(&token, "edge-a").await.unwrap(),
            Err(AgentAuthFailure::Revoked)
        );
        assert_eq!(claimed().await, None, "nothing claimed");

        // The new credential works; the old one still claims nothing.
        assert_eq!(
            store
                .accept_agent(&rotated.reveal(), "edge-a")
                .await
                .unwrap()
                .map(|claim| claim.epoch),
            Ok(1)
        );
        assert!(store.accept_agent(&token, "edge-b").await.unwrap().is_err());
        assert_eq!(claimed().await, Some(1));
    }
}
