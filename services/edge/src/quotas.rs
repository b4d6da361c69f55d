//! Caps on open sessions per API key, per device, per tenant and per client
//! address, so that no one client holds thousands of sessions. A session
//! takes its place in all four at once, or in none, and gives them back
//! when its [`QuotaGuard`] drops.
//!
//! Keys, devices and tenants are counted by a keyed 64-bit hash of their
//! id, so that a session's guard holds no copy of them (it lives as long
//! as the session: memory per idle session matters).

use std::hash::{BuildHasher, Hash, RandomState};
use std::net::IpAddr;
use std::sync::Arc;

use dashmap::DashMap;

use crate::config::QuotaConfig;

/// Which cap a session would exceed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum QuotaExceeded {
    #[error("too many sessions for this key")]
    Key,
    #[error("too many sessions for this device")]
    Device,
    #[error("too many sessions for this tenant")]
    Tenant,
    #[error("too many sessions from this address")]
    Address,
}

#[derive(Debug, Default)]
pub struct Quotas {
    config: QuotaConfig,
    /// Keys the hashes of the ids (random per process).
    hasher: RandomState,
    by_key: DashMap<u64, u32>,
    by_device: DashMap<u64, u32>,
    by_tenant: DashMap<u64, u32>,
    by_address: DashMap<IpAddr, u32>,
}

/// A session's places; given back on drop.
#[derive(Debug)]
pub struct QuotaGuard {
    quotas: Arc<Quotas>,
    key: u64,
    device: u64,
    tenant: u64,
    address: IpAddr,
}

fn take<K: Hash + Eq + Clone>(map: &DashMap<K, u32>, key: &K, cap: u32) -> bool {
    let mut count = map.entry(key.clone()).or_insert(0);
    if *count >= cap {
        return false;
    }
    *count += 1;
    true
}

fn give_back<K: Hash + Eq>(map: &DashMap<K, u32>, key: &K) {
    map.remove_if_mut(key, |_, count| {
        *count = count.saturating_sub(1);
        *count == 0
    });
}

impl Quotas {
    pub fn new(config: QuotaConfig) -> Quotas {
        Quotas {
            config,
            ..Quotas::default()
        }
    }

    /// Takes a place for a session of `key` on `device` of `tenant` from
    /// `address`.
    pub fn admit(
        self: &Arc<Self>,
        key: &str,
        device: &str,
        tenant: &str,
        address: IpAddr,
    ) -> Result<QuotaGuard, QuotaExceeded> {
        let config = &self.config;
        // Apart by kind, so that a key and a device with the same id never
        // share a count.
        let key = self.hasher.hash_one(("key", key));
        let device = self.hasher.hash_one(("device", device));
        let tenant = self.hasher.hash_one(("tenant", tenant));
        if !take(&self.by_address, &address, config.sessions_per_address) {
            return Err(QuotaExceeded::Address);
        }
        if !take(&self.by_key, &key, config.sessions_per_key) {
            give_back(&self.by_address, &address);
            return Err(QuotaExceeded::Key);
        }
        if !take(&self.by_device, &device, config.sessions_per_device) {
            give_back(&self.by_address, &address);
            give_back(&self.by_key, &key);
            return Err(QuotaExceeded::Device);
        }
        if !take(&self.by_tenant, &tenant, config.sessions_per_tenant) {
            give_back(&self.by_address, &address);
            give_back(&self.by_key, &key);
            give_back(&self.by_device, &device);
            return Err(QuotaExceeded::Tenant);
        }
        Ok(QuotaGuard {
            quotas: self.clone(),
            key,
            device,
            tenant,
            address,
        })
    }
}

impl Drop for QuotaGuard {
    fn drop(&mut self) {
        give_back(&self.quotas.by_address, &self.address);
        give_back(&self.quotas.by_key, &self.key);
        give_back(&self.quotas.by_device, &self.device);
        give_back(&self.quotas.by_tenant, &self.tenant);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn quotas() -> Arc<Quotas> {
        Arc::new(Quotas::new(QuotaConfig {
            sessions_per_key: 2,
            sessions_per_device: 3,
            sessions_per_tenant: 4,
            sessions_per_address: 5,
        }))
    }

    fn at(last: u8) -> IpAddr {
        [192, 0, 2, last].into()
    }

    #[test]
    fn each_cap_holds_and_places_come_back() {
        let quotas = quotas();
        let one = quotas.admit("k1", "d1", "t", at(1)).unwrap();
        let _two = quotas.admit("k1", "d1", "t", at(1)).unwrap();
        assert_eq!(
            quotas.admit("k1", "d1", "t", at(1)).err(),
            Some(QuotaExceeded::Key)
        );
        let _three = quotas.admit("k2", "d1", "t", at(2)).unwrap();
        assert_eq!(
            quotas.admit("k3", "d1", "t", at(3)).err(),
            Some(QuotaExceeded::Device)
        );
        let _four = quotas.admit("k3", "d2", "t", at(3)).unwrap();
        assert_eq!(
            quotas.admit("k4", "d3", "t", at(4)).err(),
            Some(QuotaExceeded::Tenant)
        );
        drop(one);
        // A refusal took nothing: the freed place is there.
        let _again = quotas.admit("k1", "d1", "t", at(1)).unwrap();
        let k1 = quotas.hasher.hash_one(("key", "k1"));
        assert_eq!(quotas.by_key.get(&k1).map(|count| *count), Some(2));
    }

    #[test]
    fn the_address_cap_counts_every_key() {
        let quotas = quotas();
        let held: Vec<_> = (0..5)
            .map(|index| {
                quotas
                    .admit(
                        &format!("k{index}"),
                        &format!("d{index}"),
                        &format!("t{index}"),
                        at(9),
                    )
                    .unwrap()
            })
            .collect();
        assert_eq!(
            quotas.admit("k9", "d9", "t9", at(9)).err(),
            Some(QuotaExceeded::Address)
        );
        drop(held);
        assert!(quotas.by_address.is_empty() && quotas.by_key.is_empty());
    }
}
