"""Which samples go into which micro-batch, and how a micro-batch becomes padded tensors.

Every epoch is one pass over the training set in a fresh order drawn from (seed, epoch) alone, so a resumed run
rebuilds exactly the order the interrupted one was following and can skip to the step it had reached.
"""
import torch

from lit_llama.data import IGNORE_INDEX

GROUP_CHUNK = 100  # with --group_by_length, samples are sorted by length within chunks of this many micro-batches


def epoch_steps(
    lengths: list[int], micro_batch_size: int, micro_batches_per_step: int, seed: int, epoch: int, group_by_length: bool
) -> list[list[list[int]]]:
    """One epoch as a list of optimizer steps, each a list of micro-batches (lists of sample indices).

    With `group_by_length`, samples of similar length share a micro-batch (sorted within chunks of the shuffled
    order) and the micro-batches are then shuffled, so padding shrinks while the order stays random.
    Samples that cannot fill a whole last step sit out this epoch; the next epoch's order differs.
    """
    generator = torch.Generator().manual_seed(seed + epoch)
    order = torch.randperm(len(lengths), generator=generator).tolist()
    if group_by_length:
        chunk = GROUP_CHUNK * micro_batch_size
        order = [
            i for start in range(0, len(order), chunk)
            for i in sorted(order[start : start + chunk], key=lambda i: lengths[i], reverse=True)
        ]
    starts = range(0, len(order) - micro_batch_size + 1, micro_batch_size)  # a last partial micro-batch sits out
    batches = [order[start : start + micro_batch_size] for start in starts]
    if group_by_length:
        batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
    n_steps = len(batches) // micro_batches_per_step
    return [batches[s * micro_batches_per_step : (s + 1) * micro_batches_per_step] for s in range(n_steps)]


def collate(samples: list[dict], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad to the longest sample of this micro-batch (right padding; labels padded with IGNORE_INDEX)."""
    longest = max(len(s["input_ids"]) for s in samples)
    input_ids = torch.full((len(samples), longest), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), longest), IGNORE_INDEX, dtype=torch.long)
    for row, sample in enumerate(samples):
        n = len(sample["input_ids"])
        input_ids[row, :n] = sample["input_ids"]
        labels[row, :n] = sample["labels"]
    return input_ids, labels
