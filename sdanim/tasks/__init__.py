"""The task floor: what a user asks for, start to finish. Animations (`walks`: morph,
animate, image morph) and stills (`images`: generate, image-to-image, inpainting,
outpainting, grids, step views). Each checks everything that needs no model before
any model is built; every front-end calls these."""
