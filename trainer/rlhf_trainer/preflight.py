"""Checks that run before a trainer starts: config, model source, batch sizes, every dataset row.

Torch-free and side-effect free: nothing is written anywhere, so a bad input fails in about a
second with one `error:` line, before a process group forms or `output_dir` is created.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any

from rlhf_trainer.config import (
    IN_TRAINER,
    DatasetSpec,
    GRPOOptions,
    ModelSource,
    PPOOptions,
    StageConfig,
    resolve_path,
    stage_types,
)
from rlhf_trainer.data.inputs import (
    EvalInputs,
    Loader,
    StageInputs,
    micro_batch_size,
)
from rlhf_trainer.data.readers import (
    PreferenceRow,
    PromptRow,
    RankedRow,
    Row,
    SFTRow,
    dataset_chat,
    load_preference_rows,
    load_prompt_rows,
    load_ranked_rows,
    load_sft_rows,
    split_eval,
)
from rlhf_trainer.errors import UserError
from rlhf_trainer.models import lora
from rlhf_trainer.rewards.functions import ScoredFunction, resolve_reward_function

if TYPE_CHECKING:
    from rlhf_trainer.feedback.stage import FeedbackInputs


def check_model_source(source: ModelSource) -> str:
    """What to pass to from_pretrained: a checked local folder, or the hub id."""
    if source.name is not None:
        return source.name
    assert source.path is not None
    path = resolve_path(source.path)
    if not path.is_dir():
        raise UserError(
            f"model.path: {path} does not exist; point model.path at a Hugging Face model "
            "folder (relative paths hang off the workspace), or build a test model with "
            "`rlhf tiny-model DIR`"
        )
    if not (path / "config.json").is_file() and not lora.is_adapter_dir(path):
        raise UserError(
            f"model.path: {path} has no config.json; point model.path at a folder written by "
            "save_pretrained"
        )
    return str(path)




def total_steps(max_steps: int | None, epochs: float, n_rows: int, batch_size: int) -> int:
    """max_steps, else ceil(epochs * rows / batch_size) (at least 1)."""
    if max_steps is not None:
        return max_steps
    # Rounding first keeps float noise (0.1 * 30 / 3 = 1.0000000000000002) from adding a step.
    return max(1, math.ceil(round(epochs * n_rows / batch_size, 9)))


# Offline stages that train: their batchSize counts dataset rows (online stages batch samples).
BATCHED_BY_ROWS = stage_types(lambda kind: kind.trains and not kind.online)


def check_batch_fits(rows: int, batch: int, field: str) -> None:
    """A batch of more rows than the training split would repeat rows inside one step."""
    if batch > rows:
        raise UserError(
            f"{field}: {batch} is more than the {rows} training rows, so one step would see "
            f"rows twice; lower it to at most {rows} or add data"
        )


def _stage_inputs(
    config: StageConfig,
    world_size: int,
    load: Loader[Row],
) -> StageInputs[Row]:
    """Batch split, model source, every row (train and held out, chat rows rendered with the
    model's template), step count."""
    hp = config.hyperparameters
    if config.dataset is None:
        raise UserError(
            f"dataset: the {config.type} stage needs a dataset; set dataset.path (a JSONL file) "
            "or dataset.name (a hub dataset)"
        )
    micro = micro_batch_size(hp.batch_size, world_size, hp.gradient_accumulation)
    model_ref = check_model_source(config.model)
    chat = dataset_chat(config.dataset, config.model)
    rows = load(config.dataset, chat)
    explicit = config.dataset.held_out()
    if explicit is not None:
        train, held_out = rows, load(explicit, chat)
    else:
        train, held_out = split_eval(rows, config.dataset.eval_fraction)
    online = config.rrhf is not None and config.rrhf.online
    if config.type in BATCHED_BY_ROWS and not online:
        check_batch_fits(len(train), hp.batch_size, "hyperparameters.batchSize")
    steps = total_steps(hp.max_steps, hp.epochs, len(train), hp.batch_size)
    skipped = getattr(rows, "skipped", 0) + getattr(held_out, "skipped", 0)
    return StageInputs(config, model_ref, train, held_out, micro, steps, skipped_rows=skipped)


def check_sft(config: StageConfig, world_size: int) -> StageInputs[SFTRow]:
    """Validate an sft stage for `world_size` ranks; raise UserError naming the problem.
    (`sft.packing: true` never gets here: SFTOptions refuses it when the config loads.)"""
    return _stage_inputs(config, world_size, load_sft_rows)


def check_reward(config: StageConfig, world_size: int) -> StageInputs[PreferenceRow]:
    """A reward stage: pairs (ranked data expands into every ordered pair)."""
    if config.lora is not None and not config.lora.merge:
        raise UserError(
            "lora.merge: a reward stage always writes its merged model (a sequence classifier "
            "with its score head); set lora.merge to true"
        )
    return _stage_inputs(config, world_size, load_preference_rows)


def check_dpo(config: StageConfig, world_size: int) -> StageInputs[PreferenceRow]:
    options = config.dpo
    if options is not None and options.label_smoothing > 0 and options.loss_type != "sigmoid":
        raise UserError(
            f"dpo.labelSmoothing: conservative DPO applies to the sigmoid loss, not "
            f"{options.loss_type}; set labelSmoothing to 0 or lossType to sigmoid"
        )
    return _stage_inputs(config, world_size, load_preference_rows)


def _scored(rows: list[RankedRow], score: ScoredFunction) -> list[RankedRow]:
    return [
        dataclasses.replace(r, rewards=tuple(score(r.prompt, y) for y in r.responses)) for r in rows
    ]


def check_rrhf(
    config: StageConfig, world_size: int
) -> StageInputs[RankedRow] | StageInputs[PromptRow]:
    """An rrhf stage. Offline: k responses per prompt, with rewards from the data, or scored by
    the reward model of `reward.from` (in the trainer) or a reward function (here). Online
    (`rrhf.online`): prompts, sampled k times per step like grpo; `batchSize` counts queries."""
    if config.rrhf is not None and config.rrhf.online:
        options = config.rrhf
        return _check_online(
            config, world_size, options.rollout_batch_size, 1, options.max_new_tokens
        )
    scorer = config.reward_model_path or config.reward_function
    function = ScoredFunction(config.reward_function) if config.reward_function else None
    inputs = _stage_inputs(
        config,
        world_size,
        lambda spec, chat: load_ranked_rows(spec, need_rewards=scorer is None, chat=chat),
    )
    if function is not None:
        train, held_out = _scored(inputs.train_rows, function), _scored(inputs.eval_rows, function)
        inputs = dataclasses.replace(inputs, train_rows=train, eval_rows=held_out)
    if config.reward_model_path is not None:
        ref = check_model_source(ModelSource(path=config.reward_model_path))
        inputs = dataclasses.replace(inputs, reward_model_ref=ref)
    return inputs


def _check_reward_source(config: StageConfig) -> None:
    """An online stage has exactly one reward source, and that source can be used."""
    judge = config.judge
    sources = [config.reward_model_path, config.reward_function, judge]
    if config.environment is not None and all(s is None for s in sources):
        return  # the episodes' rewards come from the environment
    if sum(s is not None for s in sources) != 1:
        raise UserError(
            "reward: set exactly one of reward.from (a reward stage), reward.judge (the AI "
            "judge of spec.judge) or reward.function"
        )
    if config.reward_function is not None:
        resolve_reward_function(config.reward_function)
    if judge is not None:
        if judge.mode is None:
            raise UserError(
                "judge.mode: the stage config points at the judge but says not how it rewards "
                "responses; set reward.judge.mode to pairwise or pointwise"
            )
        from rlhf_trainer.data.chat_format import load_chat_format

        load_chat_format(judge.model, judge.chat_template)  # a broken template fails here


def _check_engine(config: StageConfig) -> None:
    """What generating in the trainer (`rollout.engine: trainer`) cannot combine with."""
    assert config.rollout is not None
    if config.rollout.engine != IN_TRAINER:
        return
    options = config.ppo or config.grpo or config.rrhf
    if options is not None and options.async_:
        raise UserError(
            f"{config.type}.async: with rollout.engine `trainer` generation and training share "
            "the trainer's devices and weights; set async to false, or generate on servers "
            "(engine vllm)"
        )
    if config.lora is not None or config.rollout.lora_adapter is not None:
        raise UserError(
            "rollout.engine: `trainer` does not generate with LoRA adapters yet; train all "
            "weights or use engine vllm"
        )


def _check_online(
    config: StageConfig, world_size: int, prompts_per_step: int, per_prompt: int, max_new: int
) -> StageInputs[PromptRow]:
    """An online stage (ppo, grpo): rollout servers, one reward source, batch shapes, prompts."""
    hp = config.hyperparameters
    if config.rollout is None:
        raise UserError(
            "rollout: the stage config names no rollout servers; the operator fills them in, "
            "so run the stage through `rlhf run` or the operator"
        )
    _check_engine(config)
    if config.lora is not None and config.rollout.lora_adapter is None:
        raise UserError(
            "rollout.loraAdapter: a LoRA stage syncs its adapters under a name the servers "
            "load them as; the operator fills it in, so render the stage with it"
        )
    _check_reward_source(config)
    if config.environment is not None:
        from rlhf_trainer.online.episodes import check_environment

        check_environment(config)
    if max_new >= hp.max_length:
        raise UserError(
            f"hyperparameters.maxLength: {hp.max_length} leaves no room for prompts after "
            f"{config.type}.maxNewTokens {max_new}; raise maxLength"
        )
    samples = prompts_per_step * per_prompt
    if samples % hp.batch_size:
        raise UserError(
            f"hyperparameters.batchSize: {hp.batch_size} samples per optimizer step do not "
            f"divide the {samples} samples of a rollout step ({prompts_per_step} prompts x "
            f"{per_prompt}); pick a divisor of {samples}"
        )
    inputs = _stage_inputs(config, world_size, load_prompt_rows)
    check_batch_fits(len(inputs.train_rows), prompts_per_step, f"{config.type}.rolloutBatchSize")
    steps = total_steps(hp.max_steps, hp.epochs, len(inputs.train_rows), prompts_per_step)
    inputs = dataclasses.replace(inputs, total_steps=steps)
    if config.reward_model_path is not None:
        ref = check_model_source(ModelSource(path=config.reward_model_path))
        inputs = dataclasses.replace(inputs, reward_model_ref=ref)
    return inputs


def check_ppo(config: StageConfig, world_size: int) -> StageInputs[PromptRow]:
    """A ppo stage: one sample per prompt; the ptx data read when ptxCoef > 0 (PPOOptions
    has already refused ptxCoef without ptxDataset, and an adaptive controller without
    klTarget, when the config loaded)."""
    options = config.ppo or PPOOptions()
    if options.ptx_dataset is not None and options.ptx_coef > 0:
        load_sft_rows(options.ptx_dataset, dataset_chat(options.ptx_dataset, config.model))
    return _check_online(
        config, world_size, options.rollout_batch_size, 1, options.max_new_tokens
    )


def check_grpo(config: StageConfig, world_size: int) -> StageInputs[PromptRow]:
    """A grpo stage: G samples per prompt."""
    options = config.grpo or GRPOOptions()
    return _check_online(
        config,
        world_size,
        options.rollout_batch_size,
        options.num_generations,
        options.max_new_tokens,
    )


def check_evaluate(config: StageConfig, world_size: int) -> EvalInputs:
    """An evaluate stage: its `dataset` holds the prompts, `model` is the KL reference."""
    del world_size  # every rank evaluates its share of the prompts
    options = config.evaluate
    if config.dataset is None or options is None or not config.policies:
        raise UserError(
            "evaluate.policies: an evaluate stage needs `dataset` (prompts) and "
            "evaluate.policies (the stages to compare)"
        )
    if config.reward_function:
        resolve_reward_function(config.reward_function)
    rm = config.reward_model_path

    def rows(spec: DatasetSpec, load: Loader[Row]) -> list[Row]:
        return load(spec, dataset_chat(spec, config.model))

    return EvalInputs(
        policies={
            name: check_model_source(ModelSource(path=path))
            for name, path in config.policies.items()
        },
        prompts=rows(config.dataset, load_prompt_rows),
        reference_model=check_model_source(config.model),
        reward_model=check_model_source(ModelSource(path=rm)) if rm else None,
        reward_function=config.reward_function,
        reference_rows=rows(options.reference_dataset, load_sft_rows)
        if options.reference_dataset
        else [],
        pairs=rows(options.preference_dataset, load_preference_rows)
        if options.preference_dataset
        else [],
        max_new_tokens=options.max_new_tokens,
        batch_size=options.batch_size,
        max_length=config.hyperparameters.max_length,
        output_dir=resolve_path(config.output_dir),
    )


def check_feedback(config: StageConfig, world_size: int) -> FeedbackInputs:
    """Validate a feedback stage (it runs on rank 0 alone, so `world_size` does not matter)."""
    from rlhf_trainer.feedback.stage import check_feedback as check

    return check(config)


def describe(inputs: StageInputs[Any] | EvalInputs | FeedbackInputs) -> str:
    """One line on what validated inputs hold, for --validate-only."""
    from rlhf_trainer.feedback.stage import FeedbackInputs

    if isinstance(inputs, FeedbackInputs):
        return inputs.describe()
    if isinstance(inputs, EvalInputs):
        return f"{len(inputs.prompts)} prompts, {len(inputs.policies)} policies"
    skipped = f", {inputs.skipped_rows} invalid rows skipped" if inputs.skipped_rows else ""
    return f"{len(inputs.train_rows)} training rows, {inputs.total_steps} steps{skipped}"
