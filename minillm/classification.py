"""Sequence classification and reward models: vLLM's LLM.classify and POST /classify (chapter 10, beside embeddings).

A `*ForSequenceClassification` checkpoint (a reward model such as Skywork-Reward-Llama, a Qwen3 classifier) is the
decoder with its LM head swapped for a `score` linear [num_labels, hidden] (no bias). Its answer for a prompt is
read where a causal model has seen the whole prompt, the final hidden state (after the final norm) of the prompt's
last token:

    logits = score.weight @ hidden[last]        probs = softmax(logits)   (sigmoid when num_labels == 1)

One label makes a reward model: its one logit is the reward (a raw score; sigmoid squashes it into (0, 1), as vLLM
reports it). Several labels make a classifier whose label names come from config.json's id2label.

The engine needs nothing new for this. A classification request is an embedding request (minillm/pooling.py)
pooling LAST, not normalized: its prefill runs batched with everything else and hands back that hidden vector, and
the host multiplies it by the head, a few thousand multiply-adds per prompt. The head is read from the workers
(`read_classifier_head`, through collective_rpc, so tensor- and pipeline-parallel workers in other processes
answer too: the last stage holds it) once per classify call, a few kilobytes, so weights that update_weights
replaced are used at once. The one token every embedding request samples (and drops) comes from the embedding,
read as a tied LM head: a classification checkpoint has no LM head, and a classifier does not generate
(RequestChecks.check_sampling_params refuses it).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from minillm.config import ModelConfig
from minillm.outputs import ClassificationOutput
from minillm.pooling import PoolingParams

if TYPE_CHECKING:
    from minillm.engine.llm_engine import LLMEngine
    from minillm.engine.worker import Worker

# what a classification request pools: the prompt's last token, the vector as it is (the head reads raw values)
CLASSIFY_POOLING = PoolingParams(pooling_type="LAST", normalize=False)


@dataclass
class ClassifierHead:
    """The score head on the host: weight [num_labels, hidden] in fp32, and each row's label."""

    weight: torch.Tensor
    labels: list[str]

    def classify(self, hidden: list[float]) -> ClassificationOutput:
        """One prompt's answer from its pooled hidden state: the raw logits (a reward model's reward when
        num_labels == 1), their softmax over the labels (the sigmoid of a one-label model's logit, as vLLM reports
        it) and the likeliest label's name."""
        logits = self.weight @ torch.tensor(hidden, dtype=torch.float32)
        probs = logits.sigmoid() if len(logits) == 1 else logits.softmax(0)
        return ClassificationOutput(probs.tolist(), logits.tolist(), self.labels[int(logits.argmax())])


def read_classifier_head(worker: "Worker") -> tuple[torch.Tensor, list[str]] | None:
    """On a worker (collective_rpc): its model's score head, an fp32 copy on the CPU, and the labels; None on a
    rank without it (a pipeline stage before the last)."""
    score = getattr(worker.model, "score", None)
    weight = getattr(score, "weight", None)
    if weight is None:
        return None
    return weight.detach().float().cpu().clone(), list(worker.model_config.labels)


def classification_problem(engine: "LLMEngine") -> str | None:
    """Why `engine` cannot classify, or None: its model has no classification head, or it cannot pool."""
    config = engine.model_config
    if not config.num_labels:
        return (f"this {config.architecture} model is a generative model (an LM head, no classification head), "
                f"not a classification model: classify needs a *ForSequenceClassification checkpoint (config.json "
                f"architectures, e.g. LlamaForSequenceClassification); use generate, or embed for vectors")
    problem = engine.pooling_problem()
    return f"this engine cannot pool the prompts' hidden states: {problem}" if problem else None


def classifier_head(results: list) -> ClassifierHead:
    """The head from collective_rpc(read_classifier_head)'s answers, one per worker: the first rank holding it."""
    for result in results:
        if result is not None:
            return ClassifierHead(*result)
    raise RuntimeError("no worker holds the model's score head (num_labels > 0 but the model was built without it)")


def generation_refusal(config: ModelConfig) -> str:
    """Why a classification model refuses a generation request (RequestChecks.check_sampling_params)."""
    return (f"this {config.architecture} model is a sequence-classification model ({config.num_labels} label(s): "
            f"{', '.join(config.labels[:4])}{', ...' if config.num_labels > 4 else ''}) with a score head and no LM "
            f"head: it does not generate text; use LLM.classify (POST /classify), or LLM.embed for its hidden "
            f"states")
