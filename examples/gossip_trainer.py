"""Decentralized LoRA with a transformers Trainer (and so with TRL's trainers): one agent per torchrun process.

    torchrun --standalone --nproc-per-node 2 examples/gossip_trainer.py
    torchrun --standalone --nproc-per-node 4 examples/gossip_trainer.py --algorithm dlora --every 4 --steps 40

CPU, offline, a minute. A Trainer launched by torchrun would wrap the model in DistributedDataParallel and average
every process's gradients, i.e. train ONE model on the union of the data. ``one_agent_per_process()``, called before
anything builds ``TrainingArguments``, joins torchrun's process group for the gossip and hides torchrun from
transformers/Accelerate: each process's Trainer then trains its own agent on its own data, and the callback mixes
the LoRA factors with the ring neighbours every ``--every`` optimizer steps. Drop the call and the callback refuses
to start (it would have been a centralized run).

The model is a tiny random LLaMA (no download); agent ``i`` learns to continue sequences that count up in steps of
``i + 1`` (mod the vocabulary). Each process prints its agent's loss on every agent's kind of sequence: with 2
processes, DeCAF's two agents both ended near 0.53 on both kinds; with ``--algorithm local`` each agent reached 0.01
on its own kind and 8.3 on the other's.
"""

from __future__ import annotations

import argparse

import torch

from decaf_lora.gossip import Gossip, one_agent_per_process

VOCAB, LENGTH = 32, 16


def sequences(step: int, n: int, seed: int) -> torch.Tensor:
    """``n`` sequences counting up from a random start in steps of ``step`` (mod VOCAB)."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, VOCAB, (n, 1), generator=g)
    return (start + step * torch.arange(LENGTH)) % VOCAB


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--algorithm", default="decaf")
    ap.add_argument("--topology", default="ring")
    ap.add_argument("--every", type=int, default=5, help="optimizer steps between two mixes (K)")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--out", default="runs/gossip-trainer", help="each agent writes to OUT/agent-RANK")
    args = ap.parse_args()

    # FIRST, before TrainingArguments: one independent agent per process (no DDP, no gradient averaging).
    rank, world = one_agent_per_process()

    import peft
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments, default_data_collator

    torch.manual_seed(0)  # the same base model and the same LoRA A on every process
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=LENGTH,
    )
    lora = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        modules_to_save=["lm_head"],  # a trained head: mixed by plain weighted averaging
        task_type="CAUSAL_LM",
    )
    model = peft.get_peft_model(LlamaForCausalLM(config), lora)
    gossip = Gossip(model, args.topology, args.algorithm, every=args.every)  # the Trainer's optimizer is used

    mine = sequences(rank + 1, 256, seed=rank)
    train = [{"input_ids": s, "attention_mask": torch.ones_like(s), "labels": s} for s in mine]
    training = TrainingArguments(
        output_dir=f"{args.out}/agent-{rank}",
        max_steps=args.steps,
        per_device_train_batch_size=16,
        learning_rate=1e-2,
        use_cpu=not torch.cuda.is_available(),
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        remove_unused_columns=False,
        seed=rank,  # each agent its own batch order
    )
    trainer = Trainer(
        model=model,
        args=training,
        train_dataset=train,
        data_collator=default_data_collator,
        callbacks=[gossip.callback()],
    )
    trainer.train()

    model.eval()
    losses = []
    with torch.no_grad():
        for agent in range(world):
            s = sequences(agent + 1, 64, seed=10_000 + agent).to(model.device)
            losses.append(model(input_ids=s, labels=s).loss.item())
    shown = ", ".join(f"{a}: {v:.2f}" for a, v in enumerate(losses))
    print(
        f"agent {rank} ({args.algorithm}, {gossip.round} mixes, Trainer world size {training.world_size}): "
        f"loss on each agent's sequences {{{shown}}}\n",
        end="",  # one write per line: the processes share the terminal
        flush=True,
    )


if __name__ == "__main__":
    main()
