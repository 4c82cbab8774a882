"""Every public name, imported by the path users write, so a rename cannot silently break them."""

import importlib

import pytest

PUBLIC = {
    "efflax": ["data", "models", "nn", "optim", "sharding", "training", "__version__"],
    "efflax.data": ["AVAILABLE", "Loader", "data_dir", "data_source", "load", "load_arrays"],
    "efflax.data.builders": ["Mnist1d", "StdlibText", "stdlib_source_files", "stdlib_split_of"],
    "efflax.sharding": [
        "LOGICAL_AXIS_RULES",
        "MESH_AXES",
        "data_sharding",
        "logical_to_mesh_spec",
        "make_mesh",
        "params_shardings",
        "replicated",
        "shard_batch",
        "shard_params",
    ],
    "efflax.training": [
        "CheckpointError",
        "Hook",
        "TrainState",
        "classification_eval_fn",
        "cross_entropy_loss_fn",
        "fit",
        "make_train_step",
        "open_checkpoints",
        "plot_metrics",
        "read_metrics",
        "restore_latest",
    ],
    "efflax.models": ["CNN1D", "MLP"],
    "efflax.experiment": ["Verdict", "register", "write_metrics", "discover", "cli_main"],
    "efflax.cli": ["main"],
    "pallas_kernels": [
        "BlockSizes",
        "block_mask_from_mask",
        "causal_block_mask",
        "flash_attention",
        "flash_attention_reference",
        "local_block_mask",
    ],
    "efflax.nn": [
        "MultiHeadAttention",
        "apply_rotary_embedding",
        "dot_product_attention",
        "segment_ids_with_padding",
        "DenseFeedForward",
        "Encoder",
        "EncoderBlock",
        "MoEFeedForward",
        "moe_aux_loss",
        "prune_experts",
        "LinearRouter",
        "Routing",
        "XMoERouter",
        "combine",
        "dispatch",
        "expert_capacity",
        "expert_choice",
        "expert_choice_from_probs",
        "load_balancing_loss",
        "multiplicative_jitter",
        "router_z_loss",
        "token_choice",
        "token_choice_from_probs",
    ],
    "efflax.optim": [
        "cycle_end_steps",
        "cycle_lengths",
        "exponential_cyclic_cosine_schedule",
        "tradeoff_points",
        "LocalGDState",
        "ProxSkipState",
        "communication_period",
        "consensus_average",
        "distributed_gd",
        "local_gd",
        "make_client_step",
        "proxskip",
        "LogitsBuffer",
        "check_indices",
        "ema_update",
        "init_ema",
        "init_logits_buffer",
        "logits_buffer_bytes",
        "mesa_loss",
        "read_logits",
        "saf_loss",
        "trajectory_loss",
        "with_index_check",
        "write_logits",
    ],
}


@pytest.mark.parametrize("module", sorted(PUBLIC))
def test_public_names_import(module):
    mod = importlib.import_module(module)
    missing = [name for name in PUBLIC[module] if not hasattr(mod, name)]
    assert not missing, f"{module} lacks {missing}"
