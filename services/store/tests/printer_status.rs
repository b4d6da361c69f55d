//! Each device's printer status on both backends: the agent's link
//! reports, the edge's silences, reconnects by cause.

// Test code: a failed expectation should panic with its message.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use relay_store::testing::TestDatabase;

both_backends!(a_silence_stays_the_news_until_the_link_is_up,);

async fn a_silence_stays_the_news_until_the_link_is_up(db: &TestDatabase) {
    let store = &db.store;
    let tenant = store.create_tenant("acme").await.unwrap();
    let device = store.create_device(&tenant.id, "p1s").await.unwrap();
    assert_eq!(store.printer_status(&device.id).await.unwrap(), None);
    store
        .record_printer_link(&device.id, "up", None, None)
        .await
        .unwrap();
    store
        .record_printer_silent(&device.id, "report", "no report, nor after pushall")
        .await
        .unwrap();
    let silent = store.printer_status(&device.id).await.unwrap().unwrap();
    assert_eq!(silent.state, "silent");
    assert_eq!(silent.reason.as_deref(), Some("report"));
    let since = silent.silent_since.expect("silent since");
    // The agent's reports meanwhile are counted, the silence stays.
    store
        .record_printer_link(&device.id, "down", Some("dropped"), None)
        .await
        .unwrap();
    store
        .record_printer_link(&device.id, "connecting", None, None)
        .await
        .unwrap();
    let still = store.printer_status(&device.id).await.unwrap().unwrap();
    assert_eq!(
        (still.state.as_str(), still.silent_since),
        ("silent", Some(since))
    );
    store
        .record_printer_link(&device.id, "up", None, None)
        .await
        .unwrap();
    let up = store.printer_status(&device.id).await.unwrap().unwrap();
    assert_eq!(up.state, "up");
    assert_eq!(up.silent_since, None);
    assert_eq!(
        up.reconnects.into_iter().collect::<Vec<_>>(),
        vec![("dropped".to_owned(), 1), ("silent_report".to_owned(), 1)]
    );
}
