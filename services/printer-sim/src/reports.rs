//! What a Bambu Lab printer says on `device/<serial>/report`: small P1-style
//! deltas (`"msg":1`), the full report (`"msg":0`, about 4.4 KB), and answers
//! to requests that echo `sequence_id` and `command` with a result.

use serde_json::{Value, json};

/// Which printer family to imitate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Profile {
    /// P1/A1: small deltas each tick, the full report on `pushall`.
    P1,
    /// X1: the full report every tick.
    X1,
}

/// The full status report, padded like a real one to about 4.4 KB.
pub fn full_report(sequence: u64) -> Vec<u8> {
    let trays: Vec<Value> = (0..4)
        .map(|tray| {
            json!({
                "id": tray.to_string(), "remain": 80 - tray * 7, "k": 0.02, "n": 1.4,
                "tag_uid": "0000000000000000", "tray_id_name": "A00-K0",
                "tray_info_idx": "GFA00", "tray_type": "PLA", "tray_sub_brands": "PLA Basic",
                "tray_color": "161616FF", "tray_weight": "1000", "tray_diameter": "1.75",
                "tray_temp": "55", "tray_time": "8", "bed_temp_type": "1", "bed_temp": "35",
                "nozzle_temp_max": "230", "nozzle_temp_min": "190", "xcam_info": "000000000000000000000000",
                "tray_uuid": "00000000000000000000000000000000", "cols": ["161616FF"], "ctype": 0
            })
        })
        .collect();
    let mut report = json!({
        "print": {
            "command": "push_status", "msg": 0, "sequence_id": sequence.to_string(),
            "upgrade_state": { "sequence_id": 0, "progress": "", "status": "", "consistency_request": false,
                "dis_state": 0, "err_code": 0, "force_upgrade": false, "message": "",
                "module": "", "new_version_state": 2, "new_ver_list": [] },
            "ipcam": { "ipcam_dev": "1", "ipcam_record": "enable", "timelapse": "disable",
                "resolution": "1080p", "tutk_server": "disable", "mode_bits": 3 },
            "upload": { "status": "idle", "progress": 0, "message": "" },
            "net": { "conf": 16, "info": [{ "ip": 16777343, "mask": 16777215 }] },
            "nozzle_temper": 24.5, "nozzle_target_temper": 0, "bed_temper": 23.8, "bed_target_temper": 0,
            "chamber_temper": 5, "mc_print_stage": "1", "heatbreak_fan_speed": "0", "cooling_fan_speed": "0",
            "big_fan1_speed": "0", "big_fan2_speed": "0", "mc_percent": 0, "mc_remaining_time": 0,
            "ams_status": 0, "ams_rfid_status": 6, "hw_switch_state": 1, "spd_mag": 100, "spd_lvl": 2,
            "print_error": 0, "lifecycle": "product", "wifi_signal": "-44dBm", "gcode_state": "IDLE",
            "gcode_file_prepare_percent": "0", "queue_number": 0, "queue_total": 0, "queue_est": 0,
            "queue_sts": 0, "project_id": "0", "profile_id": "0", "task_id": "0", "subtask_id": "0",
            "subtask_name": "", "gcode_file": "", "stg": [], "stg_cur": 255, "print_type": "idle",
            "home_flag": 322454936, "mc_print_line_number": "0", "mc_print_sub_stage": 0, "sdcard": true,
            "force_upgrade": false, "mess_production_state": "active", "layer_num": 0, "total_layer_num": 0,
            "s_obj": [], "filam_bak": [], "fan_gear": 0, "nozzle_diameter": "0.4", "nozzle_type": "stainless_steel",
            "cali_version": 0, "k": "0.0200", "flag3": 15, "hms": [],
            "online": { "ahb": false, "rfid": false, "version": 7 },
            "ams": { "ams": [{ "id": "0", "humidity": "4", "temp": "0.0", "tray": trays }],
                "ams_exist_bits": "1", "tray_exist_bits": "f", "tray_is_bbl_bits": "f", "tray_tar": "255",
                "tray_now": "255", "tray_pre": "255", "tray_read_done_bits": "f", "tray_reading_bits": "0",
                "version": 4, "insert_flag": true, "power_on_flag": false },
            "vt_tray": { "id": "254", "tag_uid": "0000000000000000", "tray_id_name": "", "tray_info_idx": "",
                "tray_type": "", "tray_sub_brands": "", "tray_color": "00000000", "tray_weight": "0",
                "tray_diameter": "0.00", "tray_temp": "0", "tray_time": "0", "bed_temp_type": "0", "bed_temp": "0",
                "nozzle_temp_max": "0", "nozzle_temp_min": "0", "xcam_info": "000000000000000000000000",
                "tray_uuid": "00000000000000000000000000000000", "remain": 0, "k": 0.02, "n": 1.4,
                "cols": ["00000000"], "ctype": 0 },
            "lights_report": [{ "node": "chamber_light", "mode": "on" }],
            "xcam": { "allow_skip_parts": false, "buildplate_marker_detector": true, "first_layer_inspector": true,
                "halt_print_sensitivity": "medium", "print_halt": true, "printing_monitor": true,
                "spaghetti_detector": true }
        }
    });
    let mut text = report.to_string();
    // Real reports vary; pad to the size the load figures assume.
    const TARGET: usize = 4_400;
    if text.len() < TARGET {
        report["print"]["padding"] = json!("x".repeat(TARGET - text.len() - 14));
        text = report.to_string();
    }
    text.into_bytes()
}

/// A P1-style delta of about 100 bytes.
pub fn delta_report(sequence: u64, nozzle: f64) -> Vec<u8> {
    json!({ "print": { "command": "push_status", "msg": 1, "sequence_id": sequence.to_string(),
        "nozzle_temper": nozzle, "wifi_signal": "-44dBm" } })
    .to_string()
    .into_bytes()
}

/// The printer's answer to a request on `device/<serial>/request`: what to
/// publish on the report topic (`None` for anything it does not know).
pub fn answer(request: &[u8], sequence: u64) -> Option<Vec<u8>> {
    let request: Value = serde_json::from_slice(request).ok()?;
    let (group, body) = request.as_object()?.iter().next()?;
    let command = body.get("command")?.as_str()?;
    let sequence_id = body.get("sequence_id").cloned().unwrap_or(json!("0"));
    let known = matches!(
        (group.as_str(), command),
        ("pushing", "pushall" | "start" | "stop")
            | ("info", "get_version")
            | ("system", "ledctrl")
            | (
                "print",
                "pause" | "resume" | "stop" | "ams_filament_setting" | "extrusion_cali_sel"
            )
    );
    if !known {
        return None;
    }
    if (group.as_str(), command) == ("pushing", "pushall") {
        return Some(full_report(sequence));
    }
    let mut answer = body.clone();
    answer["sequence_id"] = sequence_id;
    answer["result"] = json!("success");
    if group == "info" {
        answer["module"] = json!([{ "name": "ota", "sw_ver": "01.08.00.00", "hw_ver": "OTA" }]);
    }
    Some(json!({ group: answer }).to_string().into_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_have_the_sizes_of_the_real_ones() {
        let full = full_report(1);
        assert!((4_300..=4_500).contains(&full.len()), "{}", full.len());
        let full: Value = serde_json::from_slice(&full).unwrap();
        assert_eq!(full["print"]["msg"], 0);
        let delta = delta_report(2, 215.0);
        assert!((60..=140).contains(&delta.len()), "{}", delta.len());
        assert_eq!(
            serde_json::from_slice::<Value>(&delta).unwrap()["print"]["msg"],
            1
        );
    }

    #[test]
    fn requests_are_echoed_with_their_sequence_id() {
        let answer_to = |request: Value| {
            answer(request.to_string().as_bytes(), 9)
                .map(|a| serde_json::from_slice::<Value>(&a).unwrap())
        };
        let led = answer_to(json!({"system": {"sequence_id": "42", "command": "ledctrl", "led_node": "chamber_light", "led_mode": "off"}})).unwrap();
        assert_eq!(led["system"]["sequence_id"], "42");
        assert_eq!(led["system"]["command"], "ledctrl");
        assert_eq!(led["system"]["result"], "success");
        let pushall =
            answer_to(json!({"pushing": {"sequence_id": "1", "command": "pushall"}})).unwrap();
        assert_eq!(pushall["print"]["msg"], 0);
        assert!(answer_to(json!({"print": {"command": "self_destruct"}})).is_none());
        assert!(answer(b"not json", 1).is_none());
    }
}
