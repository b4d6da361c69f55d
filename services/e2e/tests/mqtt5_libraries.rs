//! MQTT 5 through the whole path, with two client libraries nobody here
//! wrote, each with `protocolVersion: 5`: paho-mqtt (Python) and MQTT.js
//! (Node). Each subscribes to a Bambu printer's report, publishes a QoS 1
//! request (paho through a topic alias), reads the edge's CONNACK
//! properties, and sees the refusals' reason codes: a wrong key (0x86), no
//! key (0x87) and a read-only key's PUBACK (0x87, connection kept).

#![allow(clippy::expect_used, clippy::unwrap_used)]

use relay_store::Scope;
use relay_testkit::client_tools::{client_tools, run_python_client, scenarios};
use relay_testkit::world::*;
use serde_json::Value;

/// The keys each scenario uses.
struct Keys {
    control: String,
    read: String,
    wrong: String,
}

const PAHO: &str = r#"
import json, sys, threading
import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

port, path, ca, report, request = sys.argv[1:6]
keys = json.loads(sys.argv[6])

def run(name, key, publish_qos1):
    seen = {"scenario": name}
    done = threading.Event()
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="paho5-" + name,
                         transport="websockets", protocol=mqtt.MQTTv5)
    client.ws_set_options(path=path, headers={"Authorization": "Bearer " + key} if key else {})
    client.tls_set(ca_certs=ca)
    client.tls_insecure_set(True)  # 127.0.0.1 is not on the certificate; the chain is checked
    def on_connect(c, userdata, flags, reason, properties):
        seen["connack"] = reason.value
        seen["connack_name"] = str(reason)
        props = properties.json() if properties is not None else {}
        seen["properties"] = props
        if reason.is_failure:
            done.set()
            return
        c.subscribe(report, qos=1)
    def on_subscribe(c, userdata, mid, reasons, properties):
        seen["suback"] = [r.value for r in reasons]
        if publish_qos1:
            alias = Properties(PacketTypes.PUBLISH)
            alias.TopicAlias = 1
            c.publish(request, json.dumps({"pushing": {"sequence_id": "1", "command": "pushall"}}), qos=1, properties=alias)
    def on_publish(c, userdata, mid, reason, properties):
        seen["puback"] = reason.value
        seen["puback_name"] = str(reason)
        if "message" in seen or name == "read-only":
            done.set()
    def on_message(c, userdata, message):
        seen["message"] = message.topic
        if "puback" in seen or not publish_qos1:
            done.set()
    client.on_connect, client.on_subscribe = on_connect, on_subscribe
    client.on_publish, client.on_message = on_publish, on_message
    client.connect("127.0.0.1", int(port))
    client.loop_start()
    seen["timed_out"] = not done.wait(60)
    client.disconnect()
    client.loop_stop()
    print(json.dumps(seen), flush=True)

run("ok", keys["control"], True)
run("read-only", keys["read"], True)
run("wrong-key", keys["wrong"], False)
run("no-key", "", False)
"#;

const MQTTJS: &str = r#"
import mqtt from "mqtt";
import fs from "node:fs";

const [port, path, ca, report, request, keysJson] = process.argv.slice(2);
const keys = JSON.parse(keysJson);

function run(name, key, publish) {
  return new Promise((resolve) => {
    const seen = { scenario: name };
    const client = mqtt.connect(`wss://127.0.0.1:${port}${path}`, {
      protocolVersion: 5,
      clientId: `mqttjs5-${name}`,
      reconnectPeriod: 0,
      wsOptions: {
        headers: key ? { Authorization: `Bearer ${key}` } : {},
        ca: fs.readFileSync(ca),
        // 127.0.0.1 is not on the certificate; the chain is checked.
        checkServerIdentity: () => undefined,
      },
    });
    const finish = () => { client.end(true); resolve(seen); };
    const timer = setTimeout(() => { seen.timed_out = true; finish(); }, 60000);
    const done = () => { clearTimeout(timer); finish(); };
    client.on("connect", (connack) => {
      seen.connack = connack.reasonCode ?? 0;
      seen.properties = connack.properties ?? {};
      client.subscribe(report, { qos: 1 }, (err, granted) => {
        seen.suback = granted.map((g) => g.qos);
        if (!publish) return;
        client.publish(request, JSON.stringify({ pushing: { sequence_id: "1", command: "pushall" } }), { qos: 1 }, (err) => {
          seen.puback = err ? err.code : 0;
          seen.puback_message = err ? err.message : "";
          if (seen.message || name === "read-only") done();
        });
      });
    });
    client.on("message", (topic) => {
      seen.message = topic;
      if (seen.puback !== undefined) done();
    });
    client.on("error", (err) => {
      seen.connack = err.code;
      seen.error = err.message;
      done();
    });
  });
}

for (const [name, key, publish] of [
  ["ok", keys.control, true],
  ["read-only", keys.read, true],
  ["wrong-key", keys.wrong, false],
  ["no-key", "", false],
]) {
  console.log(JSON.stringify(await run(name, key, publish)));
}
"#;

fn check(library: &str, seen: &std::collections::HashMap<String, Value>, properties: &[&str]) {
    let ok = &seen["ok"];
    assert_ne!(ok["timed_out"], Value::Bool(true), "{library}: {ok}");
    assert_eq!(ok["connack"], 0, "{library}: {ok}");
    for property in properties {
        assert!(
            ok["properties"].get(property).is_some(),
            "{library}: CONNACK without {property}: {ok}"
        );
    }
    assert_eq!(ok["suback"], serde_json::json!([1]), "{library}: {ok}");
    assert_eq!(ok["puback"], 0, "{library}: {ok}");
    assert_eq!(ok["message"], report_topic(), "{library}: {ok}");
    let read_only = &seen["read-only"];
    assert_eq!(read_only["connack"], 0, "{library}: {read_only}");
    assert_eq!(read_only["puback"], 0x87, "{library}: {read_only}");
    assert_eq!(
        seen["wrong-key"]["connack"], 0x86,
        "{library}: {}",
        seen["wrong-key"]
    );
    assert_eq!(
        seen["no-key"]["connack"], 0x87,
        "{library}: {}",
        seen["no-key"]
    );
}

async fn keys(world: &World) -> Keys {
    Keys {
        control: world.edge.key.0.clone(),
        read: world
            .edge
            .new_bearer(Scope::Read)
            .await
            .trim_start_matches("Bearer ")
            .to_owned(),
        wrong: "rly_nosuchkey00_0000000000000000000000000000".into(),
    }
}

fn keys_json(keys: &Keys) -> String {
    serde_json::json!({ "control": keys.control, "read": keys.read, "wrong": keys.wrong })
        .to_string()
}

#[tokio::test]
async fn paho_and_mqttjs_speak_mqtt5_through_the_relay() {
    let tools = client_tools();
    let world = world_with(
        ACCESS_CODE,
        |edge| edge.public.device_in_path = true,
        |_| {},
    )
    .await;
    let keys = keys(&world).await;
    let dir = &world.edge.pki.dir;
    let ca = write(dir, "edge-ca-for-v5.pem", &world.edge.pki.ca_pem());
    let path = format!("/d/{}/mqtt", world.edge.device);
    let request = format!("device/{SERIAL}/request");
    let args = [
        world.edge.addr.port().to_string(),
        path,
        ca.display().to_string(),
        report_topic(),
        request,
        keys_json(&keys),
    ];

    let script = write(dir, "paho-v5.py", PAHO);
    let (seen, context) = run_python_client(&tools, &script, &args, PATIENCE * 8).await;
    assert_eq!(seen.len(), 4, "{context}");
    check(
        "paho",
        &seen,
        &["TopicAliasMaximum", "ReceiveMaximum", "MaximumPacketSize"],
    );

    let script = tools.join("node").join("mqttjs-v5-e2e.mjs");
    std::fs::write(&script, MQTTJS).unwrap();
    let output = tokio::time::timeout(
        PATIENCE * 8,
        tokio::process::Command::new("node")
            .arg(&script)
            .args(&args)
            .current_dir(tools.join("node"))
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("MQTT.js finished in time")
    .unwrap();
    let printed = String::from_utf8_lossy(&output.stdout);
    let seen = scenarios(&printed);
    assert_eq!(
        seen.len(),
        4,
        "{printed}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    check(
        "MQTT.js",
        &seen,
        &["topicAliasMaximum", "receiveMaximum", "maximumPacketSize"],
    );
    world.edge.stop().await;
}
