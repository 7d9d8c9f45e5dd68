"""Test helpers: a synthetic knowledge base and a small GPT-2 that knows its facts.

Used by the behaviour tests of causal tracing, ROME, MEMIT and the baselines, and by the demo::

    from lightning_rome.testing import DEEP_FACT_MODEL, accuracy, get_fact_model

    fm = get_fact_model()                      # trained once (about a minute), then cached
    requests = fm.kb.edit_requests(4, seed=0)  # counterfactual rewrites of known facts
    fact = fm.kb.fact_of(requests[0])
    neighbours = fm.kb.neighbor_facts(requests[0], 5)
    accuracy(fm.model, fm.tokenizer, neighbours, "train")

    deep = get_fact_model(DEEP_FACT_MODEL)     # 8 layers × 192, for mass-editing tests
"""

from lightning_rome.testing.counterfact_model import (
    CounterFactModel,
    CounterFactModelConfig,
    get_counterfact_model,
    measure_cases,
    select_cases,
    train_counterfact_model,
)
from lightning_rome.testing.fact_model import (
    DEEP_FACT_MODEL,
    FactModel,
    FactModelConfig,
    get_fact_model,
    train_fact_model,
)
from lightning_rome.testing.knowledge import (
    RELATIONS,
    Fact,
    KBConfig,
    KnowledgeBase,
    Relation,
    accuracy,
    answered,
    build_knowledge_base,
    edit_quality,
    known_facts,
    predicted_objects,
    prefers,
    text_corpus,
)

__all__ = [
    "DEEP_FACT_MODEL",
    "RELATIONS",
    "CounterFactModel",
    "CounterFactModelConfig",
    "Fact",
    "FactModel",
    "FactModelConfig",
    "KBConfig",
    "KnowledgeBase",
    "Relation",
    "accuracy",
    "answered",
    "build_knowledge_base",
    "edit_quality",
    "get_counterfact_model",
    "get_fact_model",
    "known_facts",
    "measure_cases",
    "predicted_objects",
    "prefers",
    "select_cases",
    "text_corpus",
    "train_counterfact_model",
    "train_fact_model",
]
