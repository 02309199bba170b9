"""Which fields of a model config (T5Config, DecoderConfig) only train: no imports, so the
run folder and the Hugging Face export both read it."""

# What a run from a Hugging Face folder takes from the run's model config, and (all but
# scan_layers) what a resumed run may change: none of it shapes the parameters or the
# optimizer state. scan_layers does shape the checkpoint's tree, so model_record keeps it.
TRAINING_FIELDS = ("dtype", "remat", "dropout_rate", "attention_impl", "attention_block",
                   "remat_policy", "scan_layers", "neftune_alpha")
