"""Weight-free planning of a run (`olavlm plan`): see :func:`olavlm.plan.build.make_plan`."""
