"""Pure math of the algorithms: losses, advantages, reward shaping. Imports only torch."""
