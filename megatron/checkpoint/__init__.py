"""Checkpoints in Megatron's two formats, written crash-safely: `torch_dist` (the default: every rank
writes its pieces through PyTorch's DCP, any layout resumes) and the legacy `torch` layout (read in any
TP x PP layout by merging; resumed in its own).

    <save>/iter_0000100/{.metadata, __<rank>_0.distcp, common.json, metadata.json, rng/}   --ckpt-format torch_dist

    <save>/latest_checkpointed_iteration.txt                "100"
    <save>/iter_0000100/mp_rank_{tp:02d}[_{pp:03d}]/model_optim_rng.pt
        {"args": {Megatron flags}, "config": {the resolved RunConfig, as plain dicts}, "iteration",
         "checkpoint_version": 3.0, "model": {state dict}, "optimizer", "rng_state", "opt_param_scheduler",
         "train_state", "consumed_*", "random_ltd"}
    <save>/iter_0000100/mp_rank_{tp:02d}[_{pp:03d}]/distrib_optim.pt     with --use-distributed-optimizer
        {"param"|"exp_avg"|"exp_avg_sq": {local parameter name: fp32 tensor}, "step"}: the DP shards,
        gathered per parameter (independent of the DP size; converted with the weights)

    torch_dist.py  the torch_dist format: save (sync or --async-save), resume in any layout, one-process read/write
    dcp_io.py      DCP taught rectangular pieces of global tensors, and a `.metadata` reader that runs no code
    dcp_state.py   a stage's parameters as pieces of layout-free global tensors (partition tags, vocab padding)
    dcp_optimizer.py  the optimizer's state as parameter-shaped pieces (distributed shards to owners and back)
    rng_json.py    RNG states as JSON
    naming.py      folder and file names: built and parsed only here
    protocol.py    save (tmp folder, fsync, rename, tracker last) and load (weights_only) one rank's file
    rng.py         the RNG states a checkpoint carries (python, numpy, torch, cuda, TP tracker)
    model_args.py  saved args <-> TransformerConfig, the model they build, do two models' flags agree
    layout.py      an unsharded state dict <-> TP x PP shards, each parameter's split read off the model
    convert.py     whole checkpoints on disk to another layout (tools/checkpoint_util.py), vocab re-padding
    reader.py      `--load` -> the unsharded model and args, any layout (evaluation, export, fine-tuning)
    megatron_lm.py a rank file written by Megatron-LM (Namespace args, TE names) read as ours, or refused
    tokenizer.py   the training tokenizer from the saved flags
    training.py    what a training run saves and how it resumes (the trainer's side)

Nothing here imports megatron.training or megatron.evaluation; megatron.core does not import this.
"""
