"""Text environments with experts: BabyAI, ScienceWorld, TextWorld-Express, Wordle, Maze."""
