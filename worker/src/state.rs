//! A rank's training state as parts (the model, the optimizer state, parameter ids): rank 0
//! uploads them as a checkpoint's objects; on resume every rank loads them from the store
//! itself (verified against the manifest), so no weights pass through the coordinator; and
//! rank 0 packs them for workers that join mid-run.
//!
//! Burn keys optimizer state by parameter id, and ids are drawn afresh whenever a model is
//! built. The checkpoint therefore also records which id each parameter path had, and a
//! resumed model takes those ids back before the optimizer state is loaded.

use std::collections::BTreeMap;
use std::path::Path;

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::optim::ModuleOptimizer;
use burn::tensor::{Device, Tensor};
use checkpoint::objects::{OPTIMIZER, PARAM_IDS, WEIGHTS};
use checkpoint::{CheckpointStore, Manifest, ObjectEntry};

use run_config::RunConfig;

use crate::error::{Error, Result};
use effnet::modelfile::{self, LoadedModel};
use effnet::phase::Phase;
use effnet::weights::ModulePath;

/// What a checkpoint restores on a worker.
pub struct Restored {
    /// The model, set up for `phase`, with the parameter ids the optimizer state names.
    pub model: LoadedModel,
    /// The phase the checkpoint was taken in.
    pub phase: Phase,
    /// The optimizer state of that phase.
    pub optimizer: ModuleOptimizer,
}

/// Upload rank 0's model and optimizer state as objects of checkpoint `name`.
pub async fn upload(
    store: &CheckpointStore,
    name: &str,
    model: &LoadedModel,
    optimizer: &ModuleOptimizer,
) -> Result<Vec<ObjectEntry>> {
    let parts = Parts::of(
        model,
        optimizer,
        Path::new(&store.describe(&format!("{name}/{WEIGHTS}"))),
    )?;
    Ok(vec![
        store.upload(name, WEIGHTS, &parts.weights).await?,
        store.upload(name, OPTIMIZER, &parts.optimizer).await?,
        store.upload(name, PARAM_IDS, &parts.ids).await?,
    ])
}

/// Load checkpoint `name` of a run configured as `config` for training: every object verified
/// against the manifest.
pub async fn restore(
    store: &CheckpointStore,
    name: &str,
    device: &Device,
    config: &RunConfig,
) -> Result<(Manifest, Restored)> {
    let manifest = store.manifest(name).await?;
    let phase = phase_named(&manifest.phase).ok_or_else(|| {
        Error::State(format!(
            "checkpoint {} names phase '{}'; expected head or finetune",
            store.describe(name),
            manifest.phase
        ))
    })?;
    let weights = store.read(&manifest, WEIGHTS).await?;
    let ids = store.read(&manifest, PARAM_IDS).await?;
    let optimizer = store.read(&manifest, OPTIMIZER).await?;
    let restored = from_parts(
        &Parts {
            weights: weights.to_vec(),
            optimizer: optimizer.to_vec(),
            ids: ids.to_vec(),
        },
        phase,
        device,
        config,
        &|object| store.describe(&format!("{name}/{object}")),
    )?;
    Ok((manifest, restored))
}

/// The phase a checkpoint or a state transfer names.
fn phase_named(name: &str) -> Option<Phase> {
    match name {
        "head" => Some(Phase::Head),
        "finetune" => Some(Phase::FineTune),
        _ => None,
    }
}

/// A rank's training state as bytes: what a checkpoint stores, and what a ring sends to the
/// workers that join it mid-run.
pub struct Parts {
    /// Our model file.
    pub weights: Vec<u8>,
    /// Burn's optimizer record (burnpack).
    pub optimizer: Vec<u8>,
    /// Parameter path -> id (JSON).
    pub ids: Vec<u8>,
}

impl Parts {
    /// The state of `model` and `optimizer`; `source` names the model file in errors.
    pub fn of(model: &LoadedModel, optimizer: &ModuleOptimizer, source: &Path) -> Result<Self> {
        Ok(Self {
            weights: modelfile::to_bytes(source, model)?,
            optimizer: optimizer
                .into_bytes()
                .map_err(|e| Error::Internal(format!("cannot encode the optimizer state: {e:?}")))?
                .to_vec(),
            ids: serde_json::to_vec(&param_ids(&model.model))
                .map_err(|e| Error::Internal(format!("cannot encode parameter ids: {e}")))?,
        })
    }

    /// One buffer: the phase, three lengths (little-endian u64) and the three parts.
    pub fn pack(&self, phase: Phase) -> Vec<u8> {
        let mut out = Vec::with_capacity(25 + self.weights.len() + self.optimizer.len() + self.ids.len());
        out.push(phase.number());
        for part in [&self.weights, &self.optimizer, &self.ids] {
            out.extend_from_slice(&(part.len() as u64).to_le_bytes());
        }
        for part in [&self.weights, &self.optimizer, &self.ids] {
            out.extend_from_slice(part);
        }
        out
    }

    /// The inverse of [`pack`](Self::pack).
    pub fn unpack(bytes: &[u8]) -> Result<(Phase, Self)> {
        let bad = |what: &str| {
            Error::State(format!(
                "malformed state transfer ({} bytes): {what}",
                bytes.len()
            ))
        };
        let phase = match bytes.first() {
            Some(1) => Phase::Head,
            Some(2) => Phase::FineTune,
            _ => return Err(bad("unknown phase byte")),
        };
        let mut lengths = [0usize; 3];
        for (i, len) in lengths.iter_mut().enumerate() {
            let at = 1 + 8 * i;
            let raw: [u8; 8] = bytes
                .get(at..at + 8)
                .and_then(|b| b.try_into().ok())
                .ok_or_else(|| bad("truncated header"))?;
            *len = usize::try_from(u64::from_le_bytes(raw)).map_err(|_| bad("length overflow"))?;
        }
        let mut at = 25;
        let mut take = |len: usize| -> Result<Vec<u8>> {
            let part = bytes
                .get(at..at + len)
                .ok_or_else(|| bad("truncated body"))?
                .to_vec();
            at += len;
            Ok(part)
        };
        let parts = Parts {
            weights: take(lengths[0])?,
            optimizer: take(lengths[1])?,
            ids: take(lengths[2])?,
        };
        Ok((phase, parts))
    }
}

/// Rebuild a rank's training state from `parts` (taken in `phase` of a run configured as
/// `config`); `describe` names each part in errors.
pub fn from_parts(
    parts: &Parts,
    phase: Phase,
    device: &Device,
    config: &RunConfig,
    describe: &dyn Fn(&str) -> String,
) -> Result<Restored> {
    // Checkpoints and state transfers name the plan's phase; phase 1 of a run from scratch
    // trains the whole network.
    let phase = phase.in_run(config.from_scratch());
    let mut model = modelfile::from_bytes(None, Path::new(&describe(WEIGHTS)), &parts.weights, device)?;
    let ids: BTreeMap<String, u64> = serde_json::from_slice(&parts.ids).map_err(|e| {
        Error::State(format!(
            "{}: not a map of parameter ids: {e}",
            describe(PARAM_IDS)
        ))
    })?;
    model.model = effnet::phase::prepare(model.model, phase);
    model.model = with_param_ids(model.model, &ids)?;
    let optimizer = crate::optim::adam(config)
        .init()
        .from_bytes(burn::tensor::Bytes::from_bytes_vec(parts.optimizer.clone()))
        .map_err(|e| Error::State(format!("{}: not an optimizer record: {e:?}", describe(OPTIMIZER))))?;
    Ok(Restored {
        model,
        phase,
        optimizer,
    })
}

/// The weights of the newest good checkpoint under `url`: its name (for messages) and bytes.
pub fn latest_weights(url: &str) -> Result<(std::path::PathBuf, Vec<u8>)> {
    let fetch = async {
        let store = CheckpointStore::open(url)?;
        let good = store
            .latest_good()
            .await?
            .ok_or_else(|| Error::NoCheckpoint(url.to_string()))?;
        for skipped in &good.skipped {
            tracing::warn!(skipped = %skipped, "skipped a checkpoint that failed verification");
        }
        let bytes = store.read(&good.manifest, WEIGHTS).await?;
        tracing::info!(checkpoint = %store.describe(&good.manifest.name), "loading weights from checkpoint");
        Ok::<_, Error>((
            store
                .describe(&format!("{}/{WEIGHTS}", good.manifest.name))
                .into(),
            bytes.to_vec(),
        ))
    };
    match tokio::runtime::Handle::try_current() {
        // A blocking thread of a running runtime (training) can drive the future directly.
        Ok(handle) => handle.block_on(fetch),
        Err(_) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(Error::Runtime)?
            .block_on(fetch),
    }
}

/// Path -> id of every float parameter of `module`.
pub fn param_ids<M: Module>(module: &M) -> BTreeMap<String, u64> {
    struct Ids {
        path: ModulePath,
        ids: BTreeMap<String, u64>,
    }
    impl ModuleVisitor for Ids {
        fn enter_module(&mut self, name: &str, container_type: &str) {
            self.path.enter(name, container_type);
        }
        fn exit_module(&mut self, _name: &str, container_type: &str) {
            self.path.exit(container_type);
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            self.ids.insert(self.path.joined(), param.id.val());
        }
    }
    let mut v = Ids {
        path: ModulePath::default(),
        ids: BTreeMap::new(),
    };
    module.visit(&mut v);
    v.ids
}

/// `module` with the parameter ids of `ids` (by path); every parameter must be listed.
pub fn with_param_ids<M: Module>(module: M, ids: &BTreeMap<String, u64>) -> Result<M> {
    struct Renumber<'a> {
        path: ModulePath,
        ids: &'a BTreeMap<String, u64>,
        missing: Vec<String>,
    }
    impl ModuleMapper for Renumber<'_> {
        fn enter_module(&mut self, name: &str, container_type: &str) {
            self.path.enter(name, container_type);
        }
        fn exit_module(&mut self, _name: &str, container_type: &str) {
            self.path.exit(container_type);
        }
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
            let path = self.path.joined();
            let Some(&id) = self.ids.get(&path) else {
                self.missing.push(path);
                return param;
            };
            let (_, value, mapper) = param.consume();
            Param::from_mapped_value(ParamId::from(id), value, mapper)
        }
    }
    let mut mapper = Renumber {
        path: ModulePath::default(),
        ids,
        missing: Vec::new(),
    };
    let module = module.map(&mut mapper);
    if !mapper.missing.is_empty() {
        return Err(Error::State(format!(
            "the checkpoint's parameter ids do not cover {} of the model's parameters (first: {})",
            mapper.missing.len(),
            mapper.missing[0]
        )));
    }
    Ok(module)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packed_state_unpacks_to_the_same_parts_and_damage_is_reported() {
        let parts = Parts {
            weights: vec![1, 2, 3],
            optimizer: vec![],
            ids: b"{}".to_vec(),
        };
        let packed = parts.pack(Phase::FineTune);
        let (phase, back) = Parts::unpack(&packed).unwrap();
        assert_eq!(phase, Phase::FineTune);
        assert_eq!(
            (back.weights, back.optimizer, back.ids),
            (parts.weights, parts.optimizer, parts.ids)
        );
        let err = Parts::unpack(&packed[..packed.len() - 1])
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("truncated body") && err.contains("29 bytes"),
            "{err}"
        );
        let err = Parts::unpack(&[9]).err().unwrap().to_string();
        assert!(err.contains("unknown phase"), "{err}");
    }
}
