"""A development script: python scripts/dev/text_mc_reading.py LLM_DIR OUT STEPS.
Continue LM training of the bootstrapped LLM on text-only MC reading (answer stated in the text); measure letter accuracy."""
import sys, json, random, torch, numpy as np
torch.set_num_threads(1)
from transformers import AutoTokenizer, LlamaForCausalLM
src, out, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
tok = AutoTokenizer.from_pretrained(src); m = LlamaForCausalLM.from_pretrained(src)
SYS = ("A chat between a curious user and an artificial intelligence assistant. The assistant "
       "gives helpful, detailed, and polite answers to the user's questions.")
COL = ["red", "green", "blue", "yellow"]; SH = ["circle", "square", "triangle"]
rng = random.Random(0)
def sample():
    k = rng.choice([2, 2, 4])
    if k == 4:
        opts = [str(x) for x in rng.sample(range(6), 4)]; ans = rng.choice(opts); fact = f"There are {ans} objects."; q = "How many objects are in the image?"
    else:
        opts = rng.sample([f"{c} {s}" for c in COL for s in SH], 2) if rng.random() < 0.7 else rng.sample(["left", "right"], 2)
        ans = rng.choice(opts); fact = f"The answer is the {ans}." ; q = f"Which one is it, the {opts[0]} or the {opts[1]}?"
    p = fact + " " + q + " Select from the following choices.\n" + "\n".join(f"({chr(65+i)}) {o}" for i, o in enumerate(opts)) + "\nOnly answer the option as the output. For example, if your answer is the option A, answer (A)."
    msgs = [{"role": "system", "content": SYS}, {"role": "user", "content": p}, {"role": "assistant", "content": f"({chr(65 + opts.index(ans))})"}]
    ids = tok.apply_chat_template(msgs, tokenize=True)["input_ids"]
    # label only the answer tokens (the assistant turn's last 4 tokens: ( X ) eot)
    return ids
def batch(n):
    seqs = [sample() for _ in range(n)]; L = max(map(len, seqs))
    x = torch.full((n, L), tok.pad_token_id); lab = torch.full((n, L), -100)
    for i, s in enumerate(seqs):
        x[i, :len(s)] = torch.tensor(s); lab[i, len(s) - 4:len(s)] = torch.tensor(s[-4:]); lab[i, :len(s)-4] = torch.tensor(s[:-4]) if WHOLE else -100
    return x, lab
WHOLE = False
opt = torch.optim.AdamW(m.parameters(), lr=2e-3, weight_decay=0)
for step in range(steps):
    x, lab = batch(16)
    loss = m(input_ids=x, attention_mask=(x != tok.pad_token_id).long(), labels=lab).loss
    loss.backward(); torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0); opt.step(); opt.zero_grad()
    if step % 50 == 0:
        print(step, round(float(loss), 4), flush=True)
m.save_pretrained(out); tok.save_pretrained(out)
