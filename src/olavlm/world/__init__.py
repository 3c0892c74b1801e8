"""ShapeWorld: the embedded synthetic world behind `olavlm demo` (generator, bootstrap, demo)."""
