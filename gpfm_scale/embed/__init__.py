"""Stage 3: bulk embedding of cohorts (tiles of slides, or labelled patch images) with any model."""
