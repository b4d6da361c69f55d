//! Python's paho-mqtt as Home Assistant's Bambu Lab integration uses it:
//! MQTT over TLS on TCP (no WebSocket), the device's hostname as the host
//! (so the TLS handshake carries it as SNI), `bblp` as the user name and
//! the whole relay key as the password. With MQTT 3.1.1 and with MQTT 5,
//! paho subscribes to the printer's report, receives one, and publishes a
//! QoS 1 request that the printer acknowledges; a wrong key is refused
//! with the CONNACK code a broker gives (4, v5 0x86).

#![allow(clippy::expect_used, clippy::unwrap_used)]

use relay_testkit::client_tools::{client_tools, run_python_client};
use relay_testkit::world::*;
use serde_json::Value;

/// `sys.argv`: the mqtts port, the device's hostname, the CA file, the
/// report and request topics, the key. `*.relay.test` resolves to
/// loopback here as a DNS record would point it at the edge; the chain
/// and the hostname are checked as paho does by default.
const PAHO: &str = r#"
import json, socket, sys, threading
import paho.mqtt.client as mqtt

port, host, ca, report, request, key = sys.argv[1:7]

resolve = socket.getaddrinfo
def relay_test_is_loopback(name, *rest, **kw):
    return resolve("127.0.0.1" if name.endswith(".relay.test") else name, *rest, **kw)
socket.getaddrinfo = relay_test_is_loopback

def run(name, protocol, password):
    seen = {"scenario": name}
    done = threading.Event()
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="paho-tcp-" + name, protocol=protocol)
    client.username_pw_set("bblp", password)
    client.tls_set(ca_certs=ca)
    def on_connect(c, userdata, flags, reason, properties):
        seen["connack"] = reason.value
        if reason.is_failure:
            done.set()
            return
        c.subscribe(report, qos=1)
    def on_connect_fail(c, userdata):
        seen["connect_failed"] = True
        done.set()
    def on_subscribe(c, userdata, mid, reasons, properties):
        seen["suback"] = [r.value for r in reasons]
    def on_message(c, userdata, message):
        if "message" in seen:
            return
        seen["message"] = message.topic
        c.publish(request, json.dumps({"info": {"sequence_id": "1", "command": "get_version"}}), qos=1)
    def on_publish(c, userdata, mid, reason, properties):
        seen["puback"] = reason.value
        done.set()
    def on_disconnect(c, userdata, flags, reason, properties):
        seen.setdefault("disconnect", reason.value)
        done.set()
    client.on_connect, client.on_connect_fail = on_connect, on_connect_fail
    client.on_subscribe, client.on_message = on_subscribe, on_message
    client.on_publish, client.on_disconnect = on_publish, on_disconnect
    try:
        client.connect(host, int(port))
    except Exception as error:
        seen["error"] = repr(error)
        print(json.dumps(seen), flush=True)
        return
    client.loop_start()
    seen["timed_out"] = not done.wait(60)
    client.disconnect()
    client.loop_stop()
    print(json.dumps(seen), flush=True)

run("3.1.1", mqtt.MQTTv311, key)
run("5", mqtt.MQTTv5, key)
run("3.1.1-wrong-key", mqtt.MQTTv311, "rly_nosuchkey00_0000000000000000000000000000")
run("5-wrong-key", mqtt.MQTTv5, "rly_nosuchkey00_0000000000000000000000000000")
"#;

#[tokio::test]
async fn paho_over_mqtts_with_the_devices_hostname_subscribes_receives_and_publishes() {
    let tools = client_tools();
    let world = world_with(
        ACCESS_CODE,
        |edge| edge.public.mqtts_listen = Some("127.0.0.1:0".parse().unwrap()),
        |_| {},
    )
    .await;
    let observations = world.simulator.observations();
    let publishes_before = observations
        .publishes
        .load(std::sync::atomic::Ordering::Relaxed);
    let mqtts = world.edge.edge.as_ref().unwrap().mqtts_addr.unwrap();
    let dir = &world.edge.pki.dir;
    let ca = write(dir, "edge-ca-for-paho-tcp.pem", &world.edge.pki.ca_pem());
    let script = write(dir, "paho-over-mqtts.py", PAHO);
    let (seen, context) = run_python_client(
        &tools,
        &script,
        &[
            mqtts.port().to_string(),
            world.edge.host(),
            ca.display().to_string(),
            report_topic(),
            format!("device/{SERIAL}/request"),
            world.edge.key.0.clone(),
        ],
        PATIENCE * 8,
    )
    .await;
    assert_eq!(seen.len(), 4, "{context}");
    for version in ["3.1.1", "5"] {
        let run = &seen[version];
        assert_eq!(run["connack"], 0, "{version}: {context}");
        assert_eq!(
            run["suback"],
            serde_json::json!([1]),
            "{version}: {context}"
        );
        assert_eq!(run["message"], report_topic(), "{version}: {context}");
        assert_eq!(run["puback"], 0, "{version}: {context}");
        assert_ne!(run["timed_out"], Value::Bool(true), "{version}: {context}");
    }
    // A broker's answer to a wrong password: 3.1.1's CONNACK 4 and v5's
    // 0x86, both "bad user name or password" (paho reports 3.1.1's 4 as
    // 0x86 too).
    assert_eq!(seen["3.1.1-wrong-key"]["connack"], 0x86, "{context}");
    assert_eq!(seen["5-wrong-key"]["connack"], 0x86, "{context}");
    // Both requests reached the printer, through its one connection.
    let publishes = observations
        .publishes
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        publishes >= publishes_before + 2,
        "the printer saw {} publishes",
        publishes - publishes_before
    );
    assert_eq!(
        observations
            .max_concurrent
            .load(std::sync::atomic::Ordering::Relaxed),
        1,
        "the printer saw one connection"
    );
    world.edge.stop().await;
}
