"""`olavlm chat --model RUN_DIR/final --image IMG [--prompt TEXT] [--max-new-tokens N]`."""

from __future__ import annotations

HELP = "commands: /image PATH (new conversation about another image), /reset, /quit"


def register(sub) -> None:
    p = sub.add_parser("chat", help="talk to a trained model about an image",
                       description="One answer with --prompt, else an interactive loop (" + HELP + ").")
    p.add_argument("--model", required=True, help="a final model folder (RUN_DIR/final)")
    p.add_argument("--image", default=None, help="image file (omit for a text-only conversation)")
    p.add_argument("--prompt", default=None, help="ask this once, print the answer and exit")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--device", default=None, help="cuda / cpu (default: cuda when available)")
    p.add_argument("--dtype", default=None, help="override the saved model.dtype (bfloat16, float16, float32)")
    p.add_argument("--template", default=None, help="override the data template of the model's processor")
    p.add_argument("--image-geometry", default=None, choices=["pad", "square", "resize"],
                   help="override the image geometry of the model's processor")
    p.add_argument("--add-bos", default=None, choices=["auto", "true", "false"],
                   help="override the BOS policy of the model's processor")
    p.set_defaults(func=run)


def run(args) -> int:
    from olavlm.infer.chat import ChatSession

    session = ChatSession(args.model, template=args.template, image_geometry=args.image_geometry,
                          add_bos=args.add_bos, device=args.device, dtype=args.dtype)
    session.set_image(args.image)
    kwargs = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature}
    if args.prompt is not None:
        print(session.ask(args.prompt, **kwargs))
        return 0
    print(HELP)
    while True:
        try:
            text = input("user> ").strip()
        except EOFError:
            print()
            return 0
        if not text:
            continue
        if text in ("/quit", "/exit"):
            return 0
        if text == "/reset":
            session.reset()
            continue
        if text.startswith("/image "):
            from olavlm.data.errors import BadSample

            try:
                session.set_image(text.split(" ", 1)[1].strip())
            except BadSample as e:  # a bad image ends this conversation, not the chat
                print(f"error: {e}")
            continue
        print(f"assistant> {session.ask(text, **kwargs)}")
