//! Leader election on a coordination.k8s.io Lease, so two replicas never run controllers at
//! once. The holder renews every `duration / 3`; another replica takes over once a Lease has
//! not been renewed for `duration`. Updates use the Lease's resourceVersion, so two
//! candidates can never both win.

use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{Api, PostParams};
use kube::core::ObjectMeta;
use tokio::sync::watch;

/// Campaigns for the Lease forever; `tx` carries whether this replica leads now.
pub async fn campaign(
    api: Api<Lease>,
    name: String,
    identity: String,
    duration: Duration,
    tx: watch::Sender<bool>,
) {
    let renew = duration / 3;
    loop {
        let leading = match try_acquire_or_renew(&api, &name, &identity, duration).await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "leader election: cannot read or update the Lease");
                false
            }
        };
        if *tx.borrow() != leading {
            tracing::info!(leading, identity = %identity, lease = %name, "leadership changed");
            let _ = tx.send(leading);
        }
        tokio::time::sleep(if leading {
            renew
        } else {
            renew.min(Duration::from_secs(2))
        })
        .await;
    }
}

async fn try_acquire_or_renew(
    api: &Api<Lease>,
    name: &str,
    identity: &str,
    duration: Duration,
) -> Result<bool, kube::Error> {
    let now = Timestamp::now();
    let secs = i32::try_from(duration.as_secs()).unwrap_or(15);
    let Some(mut lease) = api.get_opt(name).await? else {
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(name.to_owned()),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(identity.to_owned()),
                lease_duration_seconds: Some(secs),
                acquire_time: Some(MicroTime(now)),
                renew_time: Some(MicroTime(now)),
                lease_transitions: Some(0),
                ..Default::default()
            }),
        };
        return match api.create(&PostParams::default(), &lease).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
            Err(e) => Err(e),
        };
    };
    let spec = lease.spec.get_or_insert_with(Default::default);
    let holder = spec.holder_identity.clone().unwrap_or_default();
    let held_for = spec.lease_duration_seconds.unwrap_or(secs);
    let expired = spec
        .renew_time
        .as_ref()
        .map(|t| now.duration_since(t.0).as_secs() >= i64::from(held_for))
        .unwrap_or(true);
    if holder != identity && !holder.is_empty() && !expired {
        return Ok(false);
    }
    if holder != identity {
        spec.acquire_time = Some(MicroTime(now));
        spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0).saturating_add(1));
    }
    spec.holder_identity = Some(identity.to_owned());
    spec.lease_duration_seconds = Some(secs);
    spec.renew_time = Some(MicroTime(now));
    match api.replace(name, &PostParams::default(), &lease).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
        Err(e) => Err(e),
    }
}
