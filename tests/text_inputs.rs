//! Bad text-encoder inputs found by fuzzing the CLI: configs whose counts are absurd (2^31, 10^6,
//! 2^62 layers or widths once allocated gigabytes or panicked with "capacity overflow") or disagree
//! with the weights, and ids the encoder cannot take. Each must be an `Error::Input` naming the
//! file and the field, through the library and through `celframe verify` (exit code 2).
//!
//! The configs are tests/fixtures/text_encoder*_tiny/config.json with one field edited, written
//! beside a copy of the fixture's weights in a temp dir.

use std::path::{Path, PathBuf};
use std::process::Command;

use celframe::models::Place;
use celframe::models::clip::{ClipTextModel, TextEncoderKind, open_text_encoder};
use celframe::ops::Exec;
use celframe::{DType, Error};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

/// A copy of a fixture folder in the system temp dir, removed when dropped.
struct Folder(PathBuf);
impl Folder {
    /// `tag` keeps the folders of tests running at once apart.
    fn copy_of(kind: TextEncoderKind, tag: &str) -> Folder {
        let dir = std::env::temp_dir().join(format!("celframe-text-{tag}-{}-{}", kind.folder(), std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let from = fixture(&format!("{}_tiny", kind.folder()));
        for file in ["config.json", "model.safetensors"] {
            std::fs::copy(from.join(file), dir.join(file)).unwrap();
        }
        Folder(dir)
    }

    /// Writes the fixture's config with `field` set to `value` (JSON text).
    fn edit(&self, kind: TextEncoderKind, field: &str, value: &str) {
        let text = std::fs::read_to_string(fixture(&format!("{}_tiny/config.json", kind.folder()))).unwrap();
        let mut config: serde_json::Map<String, serde_json::Value> = serde_json::from_str(&text).unwrap();
        config.insert(field.to_string(), serde_json::from_str(value).unwrap());
        std::fs::write(self.0.join("config.json"), serde_json::to_string_pretty(&config).unwrap()).unwrap();
    }
}
impl Drop for Folder {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// (field, value) edits of CLIP-L's tiny config (64 wide, MLP 256, 3 layers, 1 head, 77 positions,
/// 512 tokens), each refused by name: absurd counts, counts the weights contradict, and
/// `layer_norm_eps` not positive or not finite (1e40 is infinite as float32).
const CLIP_L_EDITS: &[(&str, &str)] = &[
    ("num_hidden_layers", "2147483648"),
    ("num_hidden_layers", "1000000"),
    ("num_hidden_layers", "4611686018427387904"),
    ("num_hidden_layers", "18446744073709551615"),
    ("num_hidden_layers", "1e8"),
    ("num_hidden_layers", "4"),
    ("num_hidden_layers", "2"),
    ("hidden_size", "2147483648"),
    ("hidden_size", "100000000"),
    ("hidden_size", "4611686018427387904"),
    ("hidden_size", "128"),
    ("intermediate_size", "2147483648"),
    ("intermediate_size", "10000000"),
    ("intermediate_size", "4611686018427387904"),
    ("intermediate_size", "255"),
    ("num_attention_heads", "2147483648"),
    ("num_attention_heads", "1000000"),
    ("num_attention_heads", "4611686018427387904"),
    ("num_attention_heads", "3"),
    ("num_attention_heads", "128"),
    ("max_position_embeddings", "2147483648"),
    ("max_position_embeddings", "1000000"),
    ("max_position_embeddings", "4611686018427387904"),
    ("max_position_embeddings", "78"),
    ("vocab_size", "2147483648"),
    ("vocab_size", "100000000"),
    ("vocab_size", "4611686018427387904"),
    ("vocab_size", "513"),
    ("layer_norm_eps", "0"),
    ("layer_norm_eps", "-1e-5"),
    ("layer_norm_eps", "1e40"),
    ("layer_norm_eps", "\"nan\""),
];

/// bigG's tiny config (projection 96): the projection width is checked too.
const CLIP_G_EDITS: &[(&str, &str)] = &[
    ("projection_dim", "4611686018427387904"),
    ("projection_dim", "1000000"),
    ("projection_dim", "95"),
    ("projection_dim", "0"),
];

fn edits(kind: TextEncoderKind) -> &'static [(&'static str, &'static str)] {
    match kind {
        TextEncoderKind::ClipL => CLIP_L_EDITS,
        TextEncoderKind::ClipG => CLIP_G_EDITS,
    }
}

#[test]
fn bad_configs_are_input_errors_naming_file_and_field() {
    for kind in [TextEncoderKind::ClipL, TextEncoderKind::ClipG] {
        let folder = Folder::copy_of(kind, "lib");
        // The unedited copy loads: the errors below come from the edits.
        assert!(open_text_encoder(&folder.0, kind).is_ok());
        let config = folder.0.join("config.json").display().to_string();
        for &(field, value) in edits(kind) {
            folder.edit(kind, field, value);
            let e = open_text_encoder(&folder.0, kind).err().unwrap_or_else(|| panic!("{field} = {value} loaded"));
            println!("{field} = {value}: {e}");
            assert!(
                matches!(&e, Error::Input(m) if m.contains(&config) && m.contains(field)),
                "{field} = {value}: {e:?} should be an input error naming {config} and {field}"
            );
        }
    }
}

#[test]
fn bad_configs_through_the_cli_exit_2() {
    for kind in [TextEncoderKind::ClipL, TextEncoderKind::ClipG] {
        let folder = Folder::copy_of(kind, "cli");
        let reference = fixture(&format!("{}_tiny.reference.safetensors", kind.folder()));
        let verify = || {
            let out = Command::new(env!("CARGO_BIN_EXE_celframe"))
                .args(["verify", kind.folder(), "--device", "cpu", "--weights"])
                .arg(&folder.0)
                .arg("--reference")
                .arg(&reference)
                .output()
                .unwrap();
            (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
        };
        let (code, stderr) = verify();
        assert_eq!(code, Some(0), "the unedited copy verifies: {stderr}");
        for &(field, value) in edits(kind) {
            folder.edit(kind, field, value);
            let (code, stderr) = verify();
            assert!(
                code == Some(2) && stderr.contains(field) && stderr.contains("config.json"),
                "{field} = {value}: exit {code:?}, stderr {stderr:?}"
            );
        }
    }
}

/// The forward's id checks say what is wrong and what is expected.
#[test]
fn ids_the_encoder_cannot_take() {
    let checkpoint = open_text_encoder(&fixture("text_encoder_tiny"), TextEncoderKind::ClipL).unwrap();
    let model = ClipTextModel::new(&checkpoint, Place::Host(DType::F32)).unwrap();
    let message = |ids: &[u32], seq: usize| match model.forward(&Exec::Cpu, ids, seq, &[]) {
        Err(Error::Input(m)) => m,
        Err(e) => panic!("{e:?} should be an input error"),
        Ok(_) => panic!("{} ids as sequences of {seq} ran", ids.len()),
    };
    let m = message(&[1; 78], 78);
    assert!(
        m.contains("sequences of 78 tokens") && m.contains("1 to 77") && m.contains("max_position_embeddings"),
        "{m}"
    );
    let m = message(&[1; 10], 4);
    assert!(m.contains("10 ids") && m.contains("multiple of 4"), "{m}");
    let m = message(&[], 4);
    assert!(m.contains("0 ids"), "{m}");
    let m = message(&[1; 4], 0);
    assert!(m.contains("sequences of 0 tokens"), "{m}");
}
