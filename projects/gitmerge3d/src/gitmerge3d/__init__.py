"""GitMerge3D token merging on Sonata / Point Transformer V3, Pointcept-style."""
