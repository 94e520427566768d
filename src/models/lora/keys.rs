//! The key grammar of LoRA files: each key split into the module it adapts (still in the file's
//! own spelling, looked up later in `targets`) and the parameter it holds.
//!
//! - kohya (sd-scripts `networks/lora.py`, LyCORIS): `lora_unet_<path with _>.<param>` and
//!   `lora_te1_` / `lora_te2_` / `lora_te_`; params `lora_down.weight`, `lora_up.weight`,
//!   `lora_mid.weight`, `alpha`, DoRA's `dora_scale`, the LyCORIS factors (`hada_*`, `lokr_*`,
//!   `diff`, `diff_b`), and formats not merged (Tucker LoHa / LoKr, OFT, norm deltas) recognised
//!   so that the error names them.
//! - diffusers / PEFT: `unet.<module path>.lora_A.weight` / `.lora_B.weight` (and `.alpha` in
//!   files diffusers converted from kohya; `.lora_magnitude_vector` for PEFT DoRA),
//!   `text_encoder.` / `text_encoder_2.`; the older diffusers
//!   spellings `.lora.down.weight`, `.lora_linear_layer.down.weight` and the attention-processor
//!   form `attn1.processor.to_q_lora.down.weight` (`to_out_lora` is `to_out.0`), which diffusers'
//!   `utils/state_dict_utils.py` (`DIFFUSERS_OLD_TO_PEFT`, `KEYS_TO_ALWAYS_REPLACE`) renames the same way.

/// What one key holds for its module.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Param {
    /// The down (A) matrix: [rank, in] or [rank, in, kh, kw].
    Down,
    /// The up (B) matrix: [out, rank] or [out, rank, 1, 1].
    Up,
    /// LoCon's Tucker core (`lora_mid`): [rank, rank, kh, kw].
    Mid,
    /// The scalar alpha (scale alpha / rank).
    Alpha,
    /// DoRA's magnitude vector: kohya / LyCORIS `dora_scale` ([out, 1(, 1, 1)] or [1, in(, 1, 1)]),
    /// PEFT `lora_magnitude_vector` ([out], or [1, out, 1, 1] on a convolution).
    Magnitude,
    /// A LyCORIS factor by its parameter name: LoHa `hada_w{1,2}_{a,b}`, LoKr `lokr_w{1,2}` and
    /// `lokr_w{1,2}_{a,b}`, full-weight `diff` / `diff_b`.
    Factor(&'static str),
    /// A parameter of a format recognised but not merged yet; the text names the format.
    Unsupported(&'static str),
    /// A parameter name no format here has.
    Unknown(String),
}

/// A key split into its module (file spelling, without the parameter) and parameter.
#[derive(Debug, PartialEq, Eq)]
pub struct Key {
    pub module: String,
    pub param: Param,
}

/// kohya parameter names (after the module's first `.`).
fn kohya_param(p: &str) -> Param {
    match p {
        "lora_down.weight" => Param::Down,
        "lora_up.weight" => Param::Up,
        "lora_mid.weight" => Param::Mid,
        "alpha" => Param::Alpha,
        "dora_scale" => Param::Magnitude,
        "hada_t1" | "hada_t2" => Param::Unsupported("LoHa with Tucker cores (hada_t1/hada_t2)"),
        "lokr_t2" => Param::Unsupported("LoKr with a Tucker core (lokr_t2)"),
        _ if let Some(f) = FACTORS.iter().find(|f| **f == p) => Param::Factor(f),
        _ if p.starts_with("oft_") => Param::Unsupported("OFT (oft_*)"),
        "w_norm" | "b_norm" => Param::Unsupported("norm-layer deltas (w_norm/b_norm)"),
        _ => Param::Unknown(p.to_string()),
    }
}

/// LyCORIS factor parameters merged here.
pub const FACTORS: [&str; 12] = [
    "hada_w1_a",
    "hada_w1_b",
    "hada_w2_a",
    "hada_w2_b",
    "lokr_w1",
    "lokr_w1_a",
    "lokr_w1_b",
    "lokr_w2",
    "lokr_w2_a",
    "lokr_w2_b",
    "diff",
    "diff_b",
];

/// diffusers / PEFT suffixes, tried in order.
const DOTTED: [(&str, Param); 9] = [
    (".lora_A.weight", Param::Down),
    (".lora_B.weight", Param::Up),
    (".lora.down.weight", Param::Down),
    (".lora.up.weight", Param::Up),
    (".lora_linear_layer.down.weight", Param::Down),
    (".lora_linear_layer.up.weight", Param::Up),
    (".alpha", Param::Alpha),
    (".lora_magnitude_vector.weight", Param::Magnitude),
    (".lora_magnitude_vector", Param::Magnitude),
];

/// Splits `key`; None when it follows neither naming scheme.
pub fn split(key: &str) -> Option<Key> {
    if key.starts_with("lora_") {
        let (module, param) = key.split_once('.')?;
        return Some(Key { module: module.to_string(), param: kohya_param(param) });
    }
    for (suffix, param) in &DOTTED {
        if let Some(module) = key.strip_suffix(suffix) {
            return Some(Key { module: module.to_string(), param: param.clone() });
        }
    }
    // The attention-processor form: `<attn>.processor.<proj>_lora.{down,up}.weight`.
    let (head, param) = match key.strip_suffix("_lora.down.weight") {
        Some(h) => (h, Param::Down),
        None => (key.strip_suffix("_lora.up.weight")?, Param::Up),
    };
    let (attention, projection) = head.rsplit_once(".processor.")?;
    let projection = if projection == "to_out" { "to_out.0" } else { projection };
    Some(Key { module: format!("{attention}.{projection}"), param })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(module: &str, param: Param) -> Option<Key> {
        Some(Key { module: module.into(), param })
    }

    #[test]
    fn kohya_and_diffusers_spellings_split_into_module_and_parameter() {
        let k = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q";
        assert_eq!(split(&format!("{k}.lora_down.weight")), key(k, Param::Down));
        assert_eq!(split(&format!("{k}.alpha")), key(k, Param::Alpha));
        assert_eq!(
            split("lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_mid.weight"),
            key("lora_te2_text_model_encoder_layers_0_mlp_fc1", Param::Mid)
        );
        assert_eq!(split("lora_unet_x.hada_w1_a"), key("lora_unet_x", Param::Factor("hada_w1_a")));
        assert_eq!(split("lora_unet_x.lokr_w2_b"), key("lora_unet_x", Param::Factor("lokr_w2_b")));
        assert_eq!(split("lora_unet_x.diff_b"), key("lora_unet_x", Param::Factor("diff_b")));
        assert_eq!(split("lora_unet_x.dora_scale"), key("lora_unet_x", Param::Magnitude));
        assert_eq!(split("unet.a.to_q.lora_magnitude_vector"), key("unet.a.to_q", Param::Magnitude));
        assert_eq!(split("unet.a.to_q.lora_magnitude_vector.weight"), key("unet.a.to_q", Param::Magnitude));
        assert_eq!(
            split("lora_unet_x.lokr_t2"),
            key("lora_unet_x", Param::Unsupported("LoKr with a Tucker core (lokr_t2)"))
        );
        assert_eq!(split("lora_unet_x.hada_w3_a"), key("lora_unet_x", Param::Unknown("hada_w3_a".into())));
        assert_eq!(split("lora_unet_x.weird"), key("lora_unet_x", Param::Unknown("weird".into())));
        assert_eq!(split("lora_unet_x"), None);
        let m = "unet.down_blocks.1.attentions.0.proj_in";
        assert_eq!(split(&format!("{m}.lora_A.weight")), key(m, Param::Down));
        assert_eq!(split(&format!("{m}.lora_B.weight")), key(m, Param::Up));
        assert_eq!(split(&format!("{m}.lora.up.weight")), key(m, Param::Up));
        assert_eq!(
            split("text_encoder.text_model.encoder.layers.0.mlp.fc1.lora_linear_layer.down.weight"),
            key("text_encoder.text_model.encoder.layers.0.mlp.fc1", Param::Down)
        );
        let a = "unet.mid_block.attentions.0.transformer_blocks.0.attn2";
        assert_eq!(split(&format!("{a}.processor.to_out_lora.up.weight")), key(&format!("{a}.to_out.0"), Param::Up));
        assert_eq!(split(&format!("{a}.processor.to_k_lora.down.weight")), key(&format!("{a}.to_k"), Param::Down));
        assert_eq!(split("unet.conv_in.weight"), None);
    }
}
