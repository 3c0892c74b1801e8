"""OlaVLM: frozen vision tower -> projector -> [text | image | task tokens | text] -> any HF causal LM,
with predictors on hooked layer states and the auxiliary losses (docs/method.md, "Losses").

Dtypes: the LLM and the tower are kept in ``model.dtype``; the trainable extras (projector, task
tokens, predictors, logit scales) are fp32. Works with and without bf16 autocast.
"""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from olavlm.config import ModelConfig, RunConfig, validate, validate_against_model
from olavlm.constants import IMAGE_TOKEN_INDEX
from olavlm.geometry import ImageSpec, VisionGeometry, read_json, vision_geometry
from olavlm.model import io
from olavlm.model.predictor import predictors_keepalive, task_predictors
from olavlm.model.projector import build_projector
from olavlm.model.decode import decode
from olavlm.model.lockstep import agreed_ntp_chunks, is_fully_sharded, is_partitioned
from olavlm.model.sequence import SequenceLayout, assemble_embeddings, build_layout
from olavlm.model.task_tokens import LogitScales, TaskTokens, tasks_with_rows
from olavlm.model.vision import VisionTower
from olavlm.objectives import auxiliary_losses
from olavlm.objectives.ntp import ntp_loss

log = logging.getLogger(__name__)

EXTRA_PREFIXES = ("projector.", "task_tokens.", "predictors.", "logit_scales.")
FORWARD_MODES = ("auto", "predict", "lm")  # predictors iff targets are given / always / never


@dataclass
class OlaVLMOutput:
    loss: torch.Tensor | None  # NTP (+ embedding losses when targets are given); None without labels/targets
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)  # detached 0-dim tensors (keys in docs)
    predictions: dict[str, dict[int, torch.Tensor]] = field(default_factory=dict)  # task -> layer -> (N, *shape)
    logits: torch.Tensor | None = None  # fp32 (B, L, vocab), only with return_logits=True (tests / scoring)
    layout: SequenceLayout | None = None  # the spans of this batch


@dataclass(frozen=True)
class ForwardPlan:
    """What one forward runs, decided once from the call and the model's state."""
    predict: bool  # run the predictors on their captured layers
    score: bool  # add the auxiliary losses against the given targets
    keepalive: bool  # training with predictors: extras the loss leaves out still join the graph (DDP, ZeRO-3)

    @classmethod
    def decide(cls, mode: str, *, has_predictors: bool, has_targets: bool, training: bool) -> "ForwardPlan":
        if mode not in FORWARD_MODES:
            raise ValueError(f"mode: {mode!r} is not one of {', '.join(FORWARD_MODES)}")
        if has_targets and not has_predictors:
            raise ValueError("targets given but the model has no predictors (built with with_predictors=False)")
        predict = has_predictors and (has_targets if mode == "auto" else mode == "predict")
        return cls(predict=predict, score=has_targets and predict, keepalive=training and has_predictors)


class OlaVLM(nn.Module):
    def __init__(self, cfg: ModelConfig, llm: nn.Module, vision: VisionTower, tokenizer, geometry: VisionGeometry,
                 *, with_predictors: bool = True, tasks: list[str] | None = None) -> None:
        """``tasks``: the tasks that get predictors (default: every task with layers)."""
        super().__init__()
        validate(RunConfig(model=cfg))
        n_layers = llm.config.num_hidden_layers
        validate_against_model(cfg, num_layers=n_layers, num_image_tokens=geometry.num_tokens)
        self.cfg = cfg
        self.geometry = geometry
        self.tokenizer = tokenizer  # kept for save_pretrained and generate
        self.max_length: int | None = None  # reject longer expanded samples (set from data.max_length)
        # packed rows: "auto" = one flattened row for flash_attention_2 (varlen), else a block mask
        self.packed_attention: str = "auto"  # "auto" | "mask" | "position_ids"
        self.llm = llm
        self.vision = vision
        d = llm.config.hidden_size
        io.decoder_of(llm)  # fail early on an LLM whose layers we cannot hook
        self.projector = build_projector(cfg.projector, vision.hidden_size, d)
        self.task_tokens = TaskTokens(cfg, hidden_size=d, num_image_tokens=geometry.num_tokens,
                                      with_predictors=with_predictors)
        self.predictors = nn.ModuleDict()
        built = [n for n, t in cfg.tasks.items() if t.layers and (tasks is None or n in tasks)] if with_predictors else []
        self.logit_scales = LogitScales(
            [n for n in built if cfg.tasks[n].kind == "embedding"] if cfg.use_contrastive else [],
            init=cfg.logit_scale_init)
        for name in built:
            self.predictors[name] = task_predictors(cfg.tasks[name], d, geometry.num_tokens)

    def attach_tasks(self, tasks: dict) -> None:
        """Add fresh predictors for alignment tasks that a later stage trains (e.g. VIRAL in IFT on a
        model loaded without predictors); their configs join ``self.cfg.tasks``."""
        for name, task in tasks.items():
            if task.kind != "alignment":
                raise ValueError(f"model.tasks.{name}: only alignment tasks can be added to a built model")
            self.cfg.tasks[name] = copy.deepcopy(task)
        validate_against_model(self.cfg, num_layers=self.llm.config.num_hidden_layers,
                               num_image_tokens=self.num_image_tokens)
        for name, task in tasks.items():
            self.predictors[name] = task_predictors(task, self.llm.config.hidden_size, self.num_image_tokens).to(self.device)

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def from_config(cls, model_cfg: ModelConfig, *, with_predictors: bool = True,
                    tasks: list[str] | None = None) -> "OlaVLM":
        """New model from ``model.llm`` / ``model.vision_tower`` (hub ids or folders); extras random.
        ``tasks``: the tasks that get predictors (default: every task with layers)."""
        tokenizer = io.load_tokenizer(model_cfg)
        llm = io.load_llm(model_cfg)
        added = io.resize_for_tokenizer(llm, tokenizer)
        if added:
            log.info("added %d token(s) to the LLM embeddings (pad token), initialised to the mean row", added)
        vision = VisionTower.from_config(model_cfg)
        return cls(model_cfg, llm, vision, tokenizer, vision_geometry(model_cfg), with_predictors=with_predictors,
                   tasks=tasks)

    @classmethod
    def from_pretrained(cls, path: str | Path, *, with_predictors: bool | None = None, dtype: str | None = None,
                        attn_implementation: str | None = None) -> "OlaVLM":
        """Load a folder written by :meth:`save_pretrained` (a hub id is downloaded; nothing else is).
        ``with_predictors`` None = as saved; False drops them; ``dtype`` overrides model.dtype."""
        from safetensors.torch import load_file

        folder = io.resolve_dir(path)
        from olavlm.model import lora

        if lora.is_adapter_folder(folder):  # a LoRA run's final/: base + adapters, merged
            return lora.load_adapter_folder(folder, merge=True, dtype=dtype, attn_implementation=attn_implementation)
        cfg, meta = io.read_config(folder)
        saved_pred = bool(meta.get("with_predictors", False))
        if with_predictors is None:
            with_predictors = saved_pred
        elif with_predictors and not saved_pred:
            raise ValueError(f"{folder} was saved without predictors; load it with with_predictors=False")
        if dtype is not None:
            cfg.dtype = dtype
        if attn_implementation is not None:
            cfg.attn_implementation = attn_implementation
        model = cls.from_config(cfg, with_predictors=with_predictors)
        state = load_file(str(folder / io.WEIGHTS_NAME))
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if k.startswith(EXTRA_PREFIXES)]
        if missing:
            raise ValueError(f"{folder / io.WEIGHTS_NAME} lacks {missing[:5]}")
        kept = [k for k in unexpected if not k.startswith(("predictors.", "logit_scales.", "task_tokens."))]
        if kept or (unexpected and with_predictors):
            raise ValueError(f"{folder / io.WEIGHTS_NAME} has unexpected keys {(kept or unexpected)[:5]}")
        return model

    def save_pretrained(self, path: str | Path, *, with_predictors: bool = True) -> None:
        """HF-style folder (see olavlm.model.io); ``with_predictors=False`` drops predictors and scales."""
        from safetensors.torch import save_file

        from olavlm.model import lora

        if lora.is_lora(self.llm):  # adapters + extras only (olavlm.model.lora)
            return lora.save_adapter_folder(self, path)
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        self.llm.save_pretrained(folder / "llm")
        self.tokenizer.save_pretrained(folder / "llm")
        self.tokenizer.save_pretrained(folder)
        self.vision.save_pretrained(folder / "vision")
        pre = read_json(self.cfg.vision_tower, "preprocessor_config.json")
        (folder / "vision" / "preprocessor_config.json").write_text(json.dumps(pre, indent=2) + "\n")
        save_file(self.extra_state(with_predictors=with_predictors), str(folder / io.WEIGHTS_NAME),
                  metadata={"format": "pt"})
        io.write_config(folder, self.cfg, with_predictors=with_predictors and bool(self.predictors))

    def extra_state(self, *, with_predictors: bool) -> dict[str, torch.Tensor]:
        """The olavlm.safetensors tensors: projector, task-token rows (+ predictors and scales)."""
        keep_rows = set(tasks_with_rows(self.cfg, with_predictors=with_predictors and bool(self.predictors)))
        state = {}
        for key, value in self.state_dict().items():
            if not key.startswith(EXTRA_PREFIXES):
                continue
            if not with_predictors and key.startswith(("predictors.", "logit_scales.")):
                continue
            if key.startswith("task_tokens.rows.") and key.split(".")[2] not in keep_rows:
                continue
            state[key] = value.detach().cpu().contiguous()
        return state

    # -- facts other packages use ---------------------------------------------------------------
    @property
    def num_image_tokens(self) -> int:
        return self.geometry.num_tokens

    @property
    def tokens_per_image(self) -> int:
        """Positions one image placeholder expands to: image tokens + task tokens."""
        return self.num_image_tokens + self.task_tokens.tokens_per_image

    @property
    def image_spec(self) -> ImageSpec:
        return self.geometry.spec

    @property
    def target_shapes(self) -> dict[str, tuple[int, ...]]:
        """Per-image target shape of every task that has predictors (what teachers/cache must give)."""
        return {task: next(iter(layers.values())).output_shape for task, layers in self.predictors.items()}

    @property
    def device(self) -> torch.device:
        return self.projector_weight.device

    @property
    def projector_weight(self) -> torch.Tensor:
        """A projector parameter, for its device and dtype only: under DeepSpeed ZeRO-3 it is an empty
        shard outside the projector's forward (iterating ``parameters()`` does not gather it)."""
        return next(self.projector.parameters())

    @property
    def lockstep(self) -> bool:
        """Parameters partitioned across ranks (ZeRO-3, FSDP): every rank calls every module (see lockstep.py)."""
        return is_partitioned(self.projector_weight) or is_fully_sharded(self)

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        from olavlm.model.lora import is_adapter_param  # LoRA: adapters are their own group, the base is "llm"

        llm = dict(self.llm.named_parameters())
        return {"llm": [p for n, p in llm.items() if not is_adapter_param(n)],
                "lora": [p for n, p in llm.items() if is_adapter_param(n)], "vision": list(self.vision.parameters()),
                "projector": list(self.projector.parameters()), "task_tokens": list(self.task_tokens.parameters()),
                "predictors": list(self.predictors.parameters()), "logit_scales": list(self.logit_scales.parameters())}

    def gradient_checkpointing_enable(self) -> None:
        """Non-reentrant activation checkpointing of the LLM layers (our capture hooks fire outside the
        checkpoint); transformers 5 API (``gradient_checkpointing_enable`` is its deprecated alias)."""
        self.llm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})

    def gradient_checkpointing_disable(self) -> None:
        self.llm.activation_checkpointing_disable()

    # -- building the sequence ------------------------------------------------------------------
    def build_layout(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                     labels: torch.Tensor | None = None, *, max_length: int | None = None,
                     padding_side: str = "right", segment_ids: torch.Tensor | None = None) -> SequenceLayout:
        return build_layout(input_ids, attention_mask, labels, num_image_tokens=self.num_image_tokens,
                            task_order=self.task_tokens.order, num_task_tokens=self.cfg.num_task_tokens,
                            max_length=max_length or self.max_length, padding_side=padding_side,
                            segment_ids=segment_ids)

    def embed(self, layout: SequenceLayout, pixel_values: torch.Tensor | None,
              task_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """inputs_embeds (B, L, d) in the LLM's dtype: text embeddings, projected image features, task
        tokens (``task_tokens`` (T*K, d) = ``self.task_tokens()[0]`` when not given)."""
        n = layout.num_images
        count = 0 if pixel_values is None else pixel_values.shape[0]
        if count != n:
            raise ValueError(f"input_ids hold {n} image placeholder(s) ({IMAGE_TOKEN_INDEX}) but pixel_values "
                             f"has {count} image(s)")
        emb = self.llm.get_input_embeddings()
        w = self.projector_weight
        if n:
            feats = self.vision(pixel_values.to(self.vision.dtype))
        elif self.lockstep:  # every rank calls the tower: one blank image, no features kept
            side = self.image_spec.size
            feats = self.vision(torch.zeros(1, 3, side, side, device=w.device, dtype=self.vision.dtype))[:0]
        else:  # keeps the projector in the graph (DDP) at no cost
            feats = torch.zeros(0, self.num_image_tokens, self.vision.hidden_size, device=w.device)
        if not torch.is_autocast_enabled(w.device.type):
            feats = feats.to(w.dtype)
        image = self.projector(feats)
        if task_tokens is None:
            task_tokens = self.task_tokens()[0]
        text = emb(layout.text_ids)  # in the embedding's dtype (read from the output: no bare weight access)
        return assemble_embeddings(layout, text, image, task_tokens.to(w.device), text.dtype)

    def _decode(self, embeds: torch.Tensor, layout: SequenceLayout, layers: list[int]):
        """Final-norm states and {layer: states} at ``layers`` (see :func:`olavlm.model.decode.decode`)."""
        return decode(self.llm, embeds, layout, layers, packed_attention=self.packed_attention)

    # -- predictors and losses -------------------------------------------------------------------
    def predictor_layers(self) -> list[int]:
        return sorted({int(l) for layers in self.predictors.values() for l in layers})

    def query_tasks(self) -> list[str]:
        """Tasks whose predictors use their task-token rows as queries."""
        return [t for t in self.predictors if self.cfg.tasks[t].kind == "embedding"
                and self.cfg.tasks[t].predictor.query_source == "task_tokens"]

    def predict(self, states: dict[int, torch.Tensor], layout: SequenceLayout,
                query_rows: dict[str, torch.Tensor] | None = None) -> dict[str, dict[int, torch.Tensor]]:
        """{task: {layer: (N, *shape)}} from the captured states; ``query_rows`` = ``self.task_tokens(...)[1]``."""
        if query_rows is None:
            query_rows = self.task_tokens(self.query_tasks())[1]
        out: dict[str, dict[int, torch.Tensor]] = {}
        for task, by_layer in self.predictors.items():
            tc = self.cfg.tasks[task]
            if tc.kind == "alignment":  # the image-token positions of each layer, from the span records
                positions = layout.image_positions()
                out[task] = {int(k): mlp(states[int(k)], layout.image_sample, positions) for k, mlp in by_layer.items()}
                continue
            mask = layout.predictor_key_mask(task, include_text=self.cfg.pass_text_to_predictors)
            out[task] = {}
            for key, predictor in by_layer.items():
                layer = int(key)
                if tc.predictor.query_source == "task_tokens":
                    queries = query_rows[task][None]
                else:  # this layer's states of the image's own task tokens (pooled by the predictor)
                    queries = states[layer][layout.image_sample[:, None], layout.task_positions(task)]
                out[task][layer] = predictor(states[layer], layout.image_sample, mask, queries)
        return out

    def auxiliary_loss(self, predictions, targets, target_mask=None, *, num_images: int,
                       log_scales: dict[str, torch.Tensor] | None = None):
        """(loss, metrics) of :func:`olavlm.objectives.auxiliary_losses` with this model's config and scales."""
        return auxiliary_losses(predictions, targets, target_mask, self.cfg,
                                self.logit_scales() if log_scales is None else log_scales, num_images=num_images,
                                target_shapes=self.target_shapes, device=self.device)

    def _embedding_losses(self, predictions, targets, target_mask, n: int, metrics) -> torch.Tensor | None:
        """The auxiliary loss with metrics written into ``metrics`` (the call benchmarks/pt_memory.py makes)."""
        loss, found = self.auxiliary_loss(predictions, targets, target_mask, num_images=n)
        metrics.update(found)
        return loss

    def _keepalive(self, query_rows: dict[str, torch.Tensor], *, predicted: bool, scored: bool) -> torch.Tensor:
        """A zero that depends on every trainable extra this batch left out of the loss: the predictors
        (run on zero images) unless ``predicted``, the logit scales unless ``scored``. Only module
        forwards, no bare parameter reads: DDP (find_unused_parameters=False) sees every parameter
        used, ZeRO-3 has them gathered. Projector and task tokens are in every forward's graph."""
        total = torch.zeros((), device=self.device)
        if not predicted:
            total = total + predictors_keepalive(self.predictors, query_rows, hidden_size=self.llm.config.hidden_size,
                                                 num_task_tokens=self.cfg.num_task_tokens, device=self.device)
        if not scored and self.cfg.use_contrastive:
            total = total + sum(self.logit_scales().values(), torch.zeros((), device=self.device))
        return total * 0.0

    # -- forward ------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, pixel_values: torch.Tensor | None = None,
                targets: dict[str, torch.Tensor] | None = None, target_mask: torch.Tensor | None = None,
                num_images: torch.Tensor | None = None, segment_ids: torch.Tensor | None = None, *,
                mode: str = "auto", return_logits: bool = False, max_length: int | None = None) -> OlaVLMOutput:
        """``targets`` {task: (N, *target_shapes[task])} adds the auxiliary losses; ``target_mask``
        bool (N,) excludes images from them. ``mode`` (see :class:`ForwardPlan`): "auto" runs the
        predictors iff targets are given, "predict" always, "lm" never. ``segment_ids`` (B, T):
        packed rows (several samples per row, see olavlm.data.packing)."""
        layout = self.build_layout(input_ids, attention_mask, labels, max_length=max_length, segment_ids=segment_ids)
        if num_images is not None and int(num_images.sum()) != layout.num_images:
            raise ValueError(f"num_images sums to {int(num_images.sum())} but input_ids hold {layout.num_images} placeholders")
        plan = ForwardPlan.decide(mode, has_predictors=bool(self.predictors), has_targets=targets is not None,
                                  training=self.training and torch.is_grad_enabled())
        seq_tokens, query_rows = self.task_tokens(self.query_tasks() if plan.predict or plan.keepalive else [])
        embeds = self.embed(layout, pixel_values, seq_tokens)
        hidden, states = self._decode(embeds, layout, self.predictor_layers() if plan.predict else [])
        metrics: dict[str, torch.Tensor] = {}
        loss = None
        if labels is not None:
            loss, _ = ntp_loss(hidden, layout.labels, self.llm.get_output_embeddings(),
                               num_chunks=agreed_ntp_chunks(layout.labels) if self.lockstep else None)
            metrics["loss/ntp"] = loss.detach()
        predictions = self.predict(states, layout, query_rows) if plan.predict else {}
        if plan.score:
            aux, found = self.auxiliary_loss(predictions, targets, target_mask, num_images=layout.num_images)
            metrics.update(found)
            if aux is not None:
                loss = aux if loss is None else loss + aux
        if loss is not None and plan.keepalive and not plan.score:  # a zero-image batch is scored: zero losses keep the graph
            loss = loss + self._keepalive(query_rows, predicted=plan.predict, scored=plan.score)
        if loss is not None:
            metrics["loss"] = loss.detach()
        logits = self.llm.get_output_embeddings()(hidden).float() if return_logits else None
        return OlaVLMOutput(loss=loss, metrics=metrics, predictions=predictions, logits=logits, layout=layout)

    @torch.no_grad()
    def layer_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                     pixel_values: torch.Tensor | None, layers: list[int]) -> tuple[dict[int, torch.Tensor], SequenceLayout]:
        """{layer: (B, L, d)} = hidden_states[layer] (1-based; n_layers = final norm) and the spans."""
        n = self.llm.config.num_hidden_layers
        bad = [l for l in layers if not 1 <= l <= n]
        if bad:
            raise ValueError(f"layers {bad} are outside the LLM's 1..{n}")
        layout = self.build_layout(input_ids, attention_mask)
        _, states = self._decode(self.embed(layout, pixel_values), layout, sorted(set(layers)))
        return states, layout

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, *, max_new_tokens: int = 128, do_sample: bool = False,
                 **generate_kwargs) -> torch.Tensor:
        """New token ids (B, <= max_new_tokens) for prompts with image placeholders; greedy by
        default, KV cache on. The prompt goes through the same sequence builder (left-padded)."""
        layout = self.build_layout(input_ids, attention_mask, padding_side="left")
        embeds = self.embed(layout, pixel_values)
        generate_kwargs.setdefault("pad_token_id", self.tokenizer.pad_token_id)
        return self.llm.generate(inputs_embeds=embeds, attention_mask=layout.attention_mask.long(),
                                 max_new_tokens=max_new_tokens, do_sample=do_sample, use_cache=True,
                                 **generate_kwargs)
