"""Can a 4-layer, 128-wide Llama learn multiple-choice option matching from scratch? Pure text lookup
"(A) w1 (B) w2 ... Answer: w2 (" -> "B" over random words, 2 or 4 options (docs/demo.md, section 4.3).
Options (JSON): steps, lr, B (batch), h (width), heads, layers, nq (queries per sequence),
after (letter after the word: the classic induction layout). A development script.

  python scripts/dev/option_lookup.py '{"steps": 1000, "lr": 1e-3}'
"""
# does a 4-layer 128-wide llama learn "content (letter)" lookup from shuffled options fast?
import sys, time, random, torch, json
torch.set_num_threads(1); torch.manual_seed(0)
from transformers import LlamaConfig, LlamaForCausalLM
args = json.loads(sys.argv[1]) if len(sys.argv) > 1 else {}
V = 64; WORDS = list(range(20, 50)); LET = [10, 11, 12, 13]; LP, RP, ANS, NL = 5, 6, 7, 8
cfg = LlamaConfig(vocab_size=V, hidden_size=args.get("h",128), intermediate_size=args.get("h",128)*2, num_hidden_layers=args.get('layers',4),
                  num_attention_heads=args.get('heads',4), num_key_value_heads=args.get('heads',4), max_position_embeddings=256)
m = LlamaForCausalLM(cfg); opt = torch.optim.AdamW(m.parameters(), lr=args.get("lr", 3e-3), weight_decay=0)
rng = random.Random(0)
def sample():
    k = rng.choice([2, 4]); opts = rng.sample(WORDS, k); j = rng.randrange(k)
    seq = [1] + [rng.choice(WORDS) for _ in range(rng.randint(3, 10))]
    for i, w in enumerate(opts): seq += ([w, LP, LET[i], RP, NL] if args.get('after') else [LP, LET[i], RP, w, NL])
    qs = args.get("nq", 1); tg = []
    for q in range(qs):
        j = rng.randrange(k); seq += [ANS, opts[j], LP]; tg.append((len(seq) - 1, LET[j])); seq += [LET[j], RP, NL]
    return seq, tg
B = args.get("B", 32); t0 = time.time()
for step in range(args.get("steps", 1000)):
    batch = [sample() for _ in range(B)]; L = max(len(s) for s, _ in batch)
    ids = torch.zeros(B, L, dtype=torch.long); am = torch.zeros(B, L, dtype=torch.long)
    bi, pi, tt = [], [], []
    for i, (s, t) in enumerate(batch):
        ids[i, :len(s)] = torch.tensor(s); am[i, :len(s)] = 1
        for p, x in t: bi.append(i); pi.append(p); tt.append(x)
    tg = torch.tensor(tt)
    out = m(input_ids=ids, attention_mask=am).logits
    logits = out[torch.tensor(bi), torch.tensor(pi)]
    loss = torch.nn.functional.cross_entropy(logits, tg)
    opt.zero_grad(); loss.backward(); opt.step()
    if step % 50 == 0:
        acc = (logits.argmax(-1) == tg).float().mean().item()
        print(step, round(loss.item(), 3), acc, round(time.time() - t0, 1), flush=True)
