"""Pure data and math: interpolation, noise, keyframes and walks, the frame plan,
spacing, smoothness, the samplers' schedules, audio timing, pixels, prompt encoding
through any text encoder, and the quiet import of the Keras backend. No model here."""
