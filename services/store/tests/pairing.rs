//! Agent pairing by code (RFC 8628) on both backends: the agent polls
//! (pending, slow_down when too soon), the owner approves or denies, the
//! approved poll gets a working agent credential once, and a pairing
//! expires after 15 minutes.

// Test code: a failed expectation should panic with its message.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use relay_store::ManualClock;
use relay_store::pairing::{PAIRING_MILLIS, PairingDecision, PollOutcome};
use relay_store::testing::TestDatabase;

both_backends!(pairing_by_code,);

const START: i64 = 1_800_000_000_000;

async fn pairing_by_code(db: &TestDatabase) {
    let clock = ManualClock::starting_at(START);
    let store = db.store.clone().with_clock(clock.clone());
    let tenant = store.create_tenant("acme").await.unwrap().id;
    let device = store.create_device(&tenant, "p1s").await.unwrap().id;

    let started = store.start_pairing("192.0.2.7").await.unwrap();
    assert_eq!(started.user_code.len(), 9);
    assert_eq!(started.expires_at, START + PAIRING_MILLIS);
    let device_code = started.device_code.reveal();
    assert!(device_code.starts_with("rlp_"));
    // The owner finds it by the code as typed.
    let pending = store
        .pending_pairing(&started.user_code.to_lowercase())
        .await
        .unwrap()
        .expect("pending");
    assert_eq!(pending.requested_from, "192.0.2.7");
    let wrong = format!(
        "{}{}",
        if started.user_code.starts_with('B') {
            'C'
        } else {
            'B'
        },
        &started.user_code[1..]
    );
    assert!(store.pending_pairing(&wrong).await.unwrap().is_none());
    // Polling: pending, then too soon (slow_down, 5 s more), then pending.
    assert!(matches!(
        store.poll_pairing(&device_code).await.unwrap(),
        PollOutcome::Pending
    ));
    clock.advance(1_000);
    assert!(matches!(
        store.poll_pairing(&device_code).await.unwrap(),
        PollOutcome::SlowDown {
            interval_ms: 10_000
        }
    ));
    clock.advance(10_000);
    assert!(matches!(
        store.poll_pairing(&device_code).await.unwrap(),
        PollOutcome::Pending
    ));
    // A forged device code is unknown.
    assert!(matches!(
        store.poll_pairing("rlp_nothing").await.unwrap(),
        PollOutcome::Unknown
    ));
    // Approved: the next poll gets the device's credential, once.
    assert!(
        store
            .decide_pairing(
                &pending.id,
                &PairingDecision::Approve {
                    tenant_id: tenant.clone(),
                    device_id: device.clone()
                }
            )
            .await
            .unwrap()
    );
    assert!(
        !store
            .decide_pairing(
                &pending.id,
                &PairingDecision::Deny {
                    tenant_id: tenant.clone()
                }
            )
            .await
            .unwrap(),
        "decided once"
    );
    let PollOutcome::Approved {
        device_id,
        credential,
        ..
    } = store.poll_pairing(&device_code).await.unwrap()
    else {
        panic!("approved");
    };
    assert_eq!(device_id, device);
    assert_eq!(
        store
            .verify_agent_credential(&credential.reveal())
            .await
            .unwrap()
            .unwrap(),
        device
    );
    assert!(matches!(
        store.poll_pairing(&device_code).await.unwrap(),
        PollOutcome::Expired
    ));
    assert!(
        store
            .pending_pairing(&started.user_code)
            .await
            .unwrap()
            .is_none()
    );

    // Denied, then expired.
    let denied = store.start_pairing("192.0.2.8").await.unwrap();
    let found = store
        .pending_pairing(&denied.user_code)
        .await
        .unwrap()
        .unwrap();
    store
        .decide_pairing(
            &found.id,
            &PairingDecision::Deny {
                tenant_id: tenant.clone(),
            },
        )
        .await
        .unwrap();
    assert!(matches!(
        store
            .poll_pairing(&denied.device_code.reveal())
            .await
            .unwrap(),
        PollOutcome::Denied
    ));
    let late = store.start_pairing("192.0.2.9").await.unwrap();
    clock.advance(PAIRING_MILLIS);
    assert!(
        store
            .pending_pairing(&late.user_code)
            .await
            .unwrap()
            .is_none()
    );
    assert!(matches!(
        store
            .poll_pairing(&late.device_code.reveal())
            .await
            .unwrap(),
        PollOutcome::Expired
    ));
    let found_late = store.start_pairing("192.0.2.10").await.unwrap();
    let pending_late = store
        .pending_pairing(&found_late.user_code)
        .await
        .unwrap()
        .unwrap();
    clock.advance(PAIRING_MILLIS);
    assert!(
        !store
            .decide_pairing(
                &pending_late.id,
                &PairingDecision::Approve {
                    tenant_id: tenant.clone(),
                    device_id: device.clone()
                }
            )
            .await
            .unwrap(),
        "too late to approve"
    );
}
