"""Harvesting throughput: saelib's activation harvest against a bare transformers forward.

Both read the same batches of documents, tokenised the same way, and stop the forward pass
after the same layer:

- saelib: ``saelib.activations.harvest._forward_batch``, one batch of a harvest as
  ``harvest`` runs it (tokenisation, the nnsight trace saving the layer's output and stopping
  there, and the kept rows with their document, position and token columns);
- bare: tokenisation, then the transformers model with a forward hook on the same decoder
  layer that saves its output and raises to skip the layers after it, then the same rows.

The timed batches are interleaved (one of each per round) so background load hits both alike.
Prints the median seconds per batch, tokens/s and ``ratio = saelib tokens/s / bare tokens/s``
(goal: >= 0.9).

    python benchmarks/harvest.py [--batches N] [--warmup N] [--batch-size 16] [--layer 15]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from saelib.activations.harvest import HarvestConfig, _forward_batch, _position_mask
from saelib.data import Document, load_documents
from saelib.lm import load_lm


class StopForward(Exception):
    """Raised by the hook once the wanted layer has run."""


def bare_forward(lm, batch: list[Document], config: HarvestConfig) -> dict:
    """Tokenise, run the model up to ``config.layer`` with a plain hook, keep the same rows."""
    encoded = lm.tokenizer(
        [doc.text for doc in batch], return_tensors="pt", padding=True, padding_side="right",
        truncation=True, max_length=config.context_length, return_special_tokens_mask=True,
    )  # fmt: skip
    saved = {}

    def hook(module, inputs, output) -> None:
        saved["hidden"] = output[0] if isinstance(output, tuple) else output
        raise StopForward

    layer = lm.hf_model.model.layers[config.layer]
    handle = layer.register_forward_hook(hook)
    try:
        with torch.inference_mode():
            lm.hf_model(input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"])
    except StopForward:
        pass
    finally:
        handle.remove()
    keep = _position_mask(encoded, batch, config.positions)
    keep[:, 0] = False
    rows, cols = torch.nonzero(keep, as_tuple=True)
    return {
        "acts": saved["hidden"][rows, cols].float(),
        "token_id": encoded["input_ids"][rows, cols],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dataset", default="wiki")
    parser.add_argument("--layer", type=int, default=15)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--context-length", type=int, default=128)
    parser.add_argument("--batches", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()

    lm = load_lm(args.model)
    config = HarvestConfig(model=args.model, layer=args.layer, dataset=args.dataset,
                           context_length=args.context_length)  # fmt: skip
    documents = load_documents(args.dataset)
    size = args.batch_size
    batches = [documents[i * size : (i + 1) * size] for i in range(args.warmup + args.batches)]

    ours = _forward_batch(lm, batches[0], 0, config)
    theirs = bare_forward(lm, batches[0], config)
    assert torch.equal(ours["token_id"], theirs["token_id"])
    torch.testing.assert_close(ours["acts"], theirs["acts"])  # the same vectors

    times: dict[str, list[float]] = {"saelib": [], "bare": []}
    tokens: list[int] = []
    for index, batch in enumerate(batches):
        for name, run in (("saelib", lambda b: _forward_batch(lm, b, 0, config)),
                          ("bare", lambda b: bare_forward(lm, b, config))):  # fmt: skip
            started = time.perf_counter()
            kept = len(run(batch)["acts"])
            if index >= args.warmup:
                times[name].append(time.perf_counter() - started)
        if index >= args.warmup:
            tokens.append(kept)
    per_batch = statistics.mean(tokens)
    print(f"{args.model} layer {args.layer}, {args.dataset}, batches of {size} documents "
          f"(~{per_batch:.0f} kept tokens), {torch.get_num_threads()} threads, "
          f"median of {args.batches}")  # fmt: skip
    rates = {}
    for name, values in times.items():
        median = statistics.median(values)
        rates[name] = per_batch / median
        print(f"{name:>7}: {median * 1000:8.1f} ms/batch  {rates[name]:9.0f} tokens/s")
    ratio = rates["saelib"] / rates["bare"]
    print(f"ratio saelib / bare: {ratio:.3f} (goal >= 0.9: {'met' if ratio >= 0.9 else 'not met'})")


if __name__ == "__main__":
    main()
