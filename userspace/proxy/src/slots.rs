//! Per-key connections opened once: the first caller for a key opens it while later callers
//! wait for that one instead of opening their own, and a dead connection is replaced.

use std::{
    collections::HashMap,
    hash::Hash,
    sync::{Arc, Mutex, PoisonError},
};

type Slot<V> = Arc<tokio::sync::Mutex<Option<V>>>;

pub struct Slots<K, V> {
    map: Mutex<HashMap<K, Slot<V>>>,
}

impl<K, V> Default for Slots<K, V> {
    fn default() -> Self {
        Slots { map: Mutex::default() }
    }
}

impl<K: Hash + Eq + Clone, V: Clone> Slots<K, V> {
    /// The key's connection if `usable` says so, else the one `open` makes (which replaces it).
    pub async fn get_or_open<E>(
        &self,
        key: &K,
        usable: impl FnOnce(&V) -> bool,
        open: impl AsyncFnOnce() -> Result<V, E>,
    ) -> Result<V, E> {
        let slot = self.map.lock().unwrap_or_else(PoisonError::into_inner).entry(key.clone()).or_default().clone();
        let mut current = slot.lock().await;
        if let Some(value) = current.as_ref()
            && usable(value)
        {
            return Ok(value.clone());
        }
        // Dropping the old handle lets that connection finish what it carries and close.
        *current = None;
        let value = open().await?;
        *current = Some(value.clone());
        Ok(value)
    }

    /// Forgets the connections of keys for which `keep` is false.
    pub fn retain(&self, keep: impl Fn(&K) -> bool) {
        self.map.lock().unwrap_or_else(PoisonError::into_inner).retain(|k, _| keep(k));
    }
}
