"""Looking inside a trained model: the library behind `notebooks/explore.ipynb`.

    loading.py         load_run: a run's model, tokenizer and prepared corpus
    routing.py         MoE routing of a sentence (table, HTML, Figure); expert loads, router entropy and
                       top tokens per expert over a split
    attention_maps.py  one layer's causal attention probabilities, recomputed from its captured input;
                       the query heads of one K/V group side by side
    kv_cache.py        KV-cache bytes of GQA vs multi-head attention as the context grows (formula and
                       allocated KVCache tensors)
    tokens.py          the tokenizer's view of Portuguese: tokens per word, frequent / long tokens, and
                       a sentence as cut by our BPE and tiktoken's encodings (when available offline)

Everything reads the model through forward hooks; the model code is not changed. Figures are
matplotlib `Figure` objects (no pyplot state): display them in a notebook or `savefig` them.
"""
