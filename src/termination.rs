//! Telling a termination from a reboot, from the instance metadata: the
//! autoscaling group's target lifecycle state (`Terminated` once the group
//! has decided to end the instance) and a spot interruption notice (two
//! minutes before the instance is stopped or terminated).

use std::time::Duration;

/// Why this instance is going away, when it is.
pub async fn notice(wait: Duration) -> Option<String> {
    let client = crate::identity::imds_client(1);
    let ask = async {
        let (lifecycle, spot) = tokio::join!(
            client.get("/latest/meta-data/autoscaling/target-lifecycle-state"),
            client.get("/latest/meta-data/spot/instance-action"),
        );
        if let Ok(state) = &lifecycle {
            let state = state.as_ref().trim();
            tracing::debug!("autoscaling target lifecycle state: {state}");
            if state == "Terminated" {
                return Some("the autoscaling group is terminating this instance".to_string());
            }
        }
        // Absent (404) unless the instance is marked for interruption.
        if let Ok(action) = &spot {
            let action: serde_json::Value =
                serde_json::from_str(action.as_ref()).unwrap_or_default();
            // A stop or hibernation keeps the instance (and its Raft data):
            // like a reboot, it keeps its slot, which expires if it stays
            // down.
            let what = action["action"].as_str().unwrap_or("terminate");
            if what == "terminate" {
                return Some(format!(
                    "a spot interruption notice: {what} at {}",
                    action["time"].as_str().unwrap_or("?")
                ));
            }
        }
        None
    };
    tokio::time::timeout(wait, ask).await.unwrap_or_else(|_| {
        tracing::debug!("the instance metadata service did not answer within {wait:?}");
        None
    })
}
