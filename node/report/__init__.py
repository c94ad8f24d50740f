"""Results out of the node for people: the results export and the survival/discrimination audit."""
