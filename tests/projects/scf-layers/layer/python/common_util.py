def greet(name):
    return "hello " + name + " from a layer"
